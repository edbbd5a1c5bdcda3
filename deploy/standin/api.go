package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"

	"github.com/fleetmanager/fm/internal/atomicfile"
)

// The errorType DSS's API gives with each status the stand-in answers, so
// that FM's agent meets here the errors it meets on DSS.
const (
	errBadRequest = "java.lang.IllegalArgumentException"
	errNotFound   = "com.dataiku.dip.server.controllers.NotFoundException"
	errConflict   = "java.lang.IllegalStateException"
	errInternal   = "java.io.IOException"
)

// apiError is a refusal of the admin API: its status and DSS's body.
type apiError struct {
	status    int
	errorType string
	message   string
}

func (e *apiError) Error() string { return e.message }

func badRequest(format string, args ...any) error {
	return &apiError{400, errBadRequest, fmt.Sprintf(format, args...)}
}

func notFound(format string, args ...any) error {
	return &apiError{404, errNotFound, fmt.Sprintf(format, args...)}
}

func conflict(format string, args ...any) error {
	return &apiError{409, errConflict, fmt.Sprintf(format, args...)}
}

// apiHandler serves one route of the admin API: it returns the value to
// answer with 200, or an error (an *apiError for a refusal).
type apiHandler func(r *http.Request) (any, error)

// api turns an apiHandler into an HTTP handler answering in DSS's shape;
// it caps the body at 1 MiB.
func (s *service) api(h apiHandler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, 1<<20)
		v, err := h(r)
		var refused *apiError
		switch {
		case errors.As(err, &refused):
			writeJSON(w, refused.status, map[string]string{"errorType": refused.errorType, "message": refused.message})
		case err != nil:
			s.log.Printf("%s %s: %v", r.Method, r.URL.Path, err)
			writeJSON(w, 500, map[string]string{"errorType": errInternal, "message": err.Error()})
		default:
			writeJSON(w, 200, v)
		}
	}
}

// decodeBody reads the request's body, one JSON value, into v. Numbers
// stay as written (json.Number), so that what is stored is what was sent.
func decodeBody(r *http.Request, v any) error {
	dec := json.NewDecoder(r.Body)
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		return badRequest("the body is not the JSON expected: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return badRequest("the body holds more than one JSON value")
	}
	return nil
}

// readJSONFile reads the JSON file at path into v, numbers as
// json.Number; found is false when there is no such file.
func readJSONFile(path string, v any) (found bool, err error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		return true, fmt.Errorf("%s: %w", path, err)
	}
	return true, nil
}

// writeJSONFile writes v, indented, to path unless the file already holds
// exactly those bytes: a setting applied again must leave the file (its
// bytes and its mtime) alone, as FM's agent and its tests rely on. Maps'
// keys are sorted, so the same value always gives the same bytes.
func writeJSONFile(path string, v any, perm os.FileMode) (changed bool, err error) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return false, err
	}
	return writeIfChanged(path, append(b, '\n'), perm)
}

func writeIfChanged(path string, b []byte, perm os.FileMode) (changed bool, err error) {
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, b) {
		return false, nil
	}
	return true, atomicfile.WriteFile(path, b, perm)
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
