package server

import (
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// apiError is an error meant for the API caller: a stable code, a short
// message and a detailed one. Internal causes stay in cause, which is logged
// and never sent.
type apiError struct {
	code    protocol.Code
	message string
	detail  string
	cause   error
	// retryAfter, if set, is sent as the Retry-After header.
	retryAfter time.Duration
	// kind, if set, is a sentinel the error matches (errors.Is) for the
	// server's own callers: not a cause (nothing went wrong to log).
	kind error
}

func (e *apiError) Is(target error) bool { return e.kind != nil && target == e.kind }

func (e *apiError) Error() string {
	if e.cause != nil {
		return fmt.Sprintf("%s: %s: %v", e.code, e.detail, e.cause)
	}
	return fmt.Sprintf("%s: %s", e.code, e.detail)
}

func (e *apiError) Unwrap() error { return e.cause }

func newAPIError(code protocol.Code, message, format string, args ...any) *apiError {
	return &apiError{code: code, message: message, detail: fmt.Sprintf(format, args...)}
}

// invalid is a rejected request: the detail names the field and the rule.
func invalid(format string, args ...any) *apiError {
	return newAPIError(protocol.CodeInvalidArgument, "Invalid request", format, args...)
}

func notFound(kind, id string) *apiError {
	return newAPIError(protocol.CodeNotFound, "Not found", "%s %q does not exist", kind, id)
}

func conflict(format string, args ...any) *apiError {
	return newAPIError(protocol.CodeConflict, "Conflict", format, args...)
}

func precondition(format string, args ...any) *apiError {
	return newAPIError(protocol.CodeFailedPrecondition, "Not allowed now", format, args...)
}

// limited is the refusal of an attempt at a credential made too often
// (the cause, *errLimited, says until when); what refused it is named for
// the caller.
func limited(cause error, format string, args ...any) *apiError {
	var l *errLimited
	if !errors.As(cause, &l) {
		return unavailable(cause, "the request was cut short; retry")
	}
	e := newAPIError(protocol.CodeResourceExhausted, "Too many failed attempts", format, args...)
	e.detail += fmt.Sprintf("; retry in %d s", retryAfterSeconds(l.retryAfter))
	e.retryAfter = l.retryAfter
	return e
}

// internal hides cause from the caller; it is logged.
func internal(cause error, format string, args ...any) *apiError {
	e := newAPIError(protocol.CodeInternal, "Internal error", format, args...)
	e.cause = cause
	return e
}

func unavailable(cause error, format string, args ...any) *apiError {
	e := newAPIError(protocol.CodeUnavailable, "Service unavailable", format, args...)
	e.cause = cause
	return e
}

// asAPIError turns any error into what the caller sees.
func asAPIError(err error) *apiError {
	var ae *apiError
	if errors.As(err, &ae) {
		return ae
	}
	var pe *protocol.Error
	if errors.As(err, &pe) {
		return &apiError{code: pe.Code, message: string(pe.Code), detail: pe.Message}
	}
	return internal(err, "unexpected error; see the server log")
}

func (e *apiError) body() api.Error {
	return api.Error{ErrorType: string(e.code), Message: e.message, DetailedMessage: e.detail}
}

// httpStatus maps a code to the HTTP status of the response.
func httpStatus(code protocol.Code) int {
	switch code {
	case protocol.CodeInvalidArgument, protocol.CodeUnsupportedVersion:
		return http.StatusBadRequest
	case protocol.CodeMethodNotAllowed:
		return http.StatusMethodNotAllowed
	case protocol.CodeRequestTooLarge:
		return http.StatusRequestEntityTooLarge
	case protocol.CodeUnauthenticated:
		return http.StatusUnauthorized
	case protocol.CodePermissionDenied:
		return http.StatusForbidden
	case protocol.CodeNotFound:
		return http.StatusNotFound
	case protocol.CodeAlreadyExists, protocol.CodeConflict, protocol.CodeFailedPrecondition, protocol.CodeAborted:
		return http.StatusConflict
	case protocol.CodeUnsupported:
		return http.StatusUnprocessableEntity
	case protocol.CodeResourceExhausted:
		return http.StatusTooManyRequests
	case protocol.CodeUnimplemented:
		return http.StatusNotImplemented
	case protocol.CodeUnavailable:
		return http.StatusServiceUnavailable
	case protocol.CodeDeadlineExceeded:
		return http.StatusGatewayTimeout
	default:
		return http.StatusInternalServerError
	}
}
