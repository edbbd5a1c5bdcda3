package protocol

import (
	"errors"
	"fmt"
)

// Code is a stable error code. Codes cross the wire in bus messages and as the
// "errorType" of REST error bodies; callers branch on them, so their spelling
// never changes.
type Code string

// The codes, modelled on the canonical gRPC status codes so that their meaning
// is familiar.
const (
	CodeInvalidArgument    Code = "InvalidArgument"    // the request is malformed or breaks a rule; nothing changed
	CodeNotFound           Code = "NotFound"           // the object does not exist
	CodeAlreadyExists      Code = "AlreadyExists"      // an object with that identity already exists
	CodeConflict           Code = "Conflict"           // a concurrent change won; read again and retry
	CodeFailedPrecondition Code = "FailedPrecondition" // not allowed in the object's current state
	CodeUnauthenticated    Code = "Unauthenticated"    // no valid credentials
	CodePermissionDenied   Code = "PermissionDenied"   // valid credentials, not allowed
	CodeResourceExhausted  Code = "ResourceExhausted"  // too many requests, or a limit is reached
	CodeAborted            Code = "Aborted"            // the operation was aborted
	CodeDeadlineExceeded   Code = "DeadlineExceeded"   // the operation took too long
	CodeUnimplemented      Code = "Unimplemented"      // FM does not support this
	CodeUnsupported        Code = "Unsupported"        // the machine or image cannot do this
	CodeUnavailable        Code = "Unavailable"        // a dependency is unreachable; retry later
	CodeInternal           Code = "Internal"           // a bug or an unexpected failure
	CodeDataLoss           Code = "DataLoss"           // stored data is missing or fails its integrity check
	CodeUnsupportedVersion Code = "UnsupportedVersion" // a message of a protocol version this role does not speak
	CodeMethodNotAllowed   Code = "MethodNotAllowed"   // the endpoint exists, not with this HTTP method (REST only)
	CodeRequestTooLarge    Code = "RequestTooLarge"    // the request body is larger than the endpoint takes (REST only)
)

// Error is an error that crosses the wire: a stable code and a message meant
// for a person. It never holds secrets.
type Error struct {
	Code    Code   `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return string(e.Code) + ": " + e.Message }

// Errorf builds an Error with a formatted message.
func Errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// CodeOf returns the code of the first *Error in err's chain, or
// CodeInternal when there is none.
func CodeOf(err error) Code {
	var pe *Error
	if errors.As(err, &pe) {
		return pe.Code
	}
	return CodeInternal
}

// ErrUnsupportedVersion is returned (wrapped) by Decode for a message whose
// version this build does not speak.
var ErrUnsupportedVersion = errors.New("unsupported protocol version")

// ErrMalformed is returned (wrapped) by Decode for a message that is not
// valid JSON of the expected shape or breaks a rule of its type.
var ErrMalformed = errors.New("malformed message")
