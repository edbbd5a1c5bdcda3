package server

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// msgGetRequest is the JetStream API's STREAM.MSG.GET request: the message
// at Seq, or the first at or after Seq (or StartTime) whose subject matches
// NextFor, or the last whose subject is LastFor.
type msgGetRequest struct {
	Seq       uint64     `json:"seq,omitempty"`
	LastFor   string     `json:"last_by_subj,omitempty"`
	NextFor   string     `json:"next_by_subj,omitempty"`
	StartTime *time.Time `json:"start_time,omitempty"`
}

// storedMsg is a message as STREAM.MSG.GET answers it.
type storedMsg struct {
	Subject string    `json:"subject"`
	Seq     uint64    `json:"seq"`
	Hdrs    []byte    `json:"hdrs"`
	Data    []byte    `json:"data"`
	Time    time.Time `json:"time"`
}

// getStoredMsg asks a stream's leader for a message (STREAM.MSG.GET, which
// only the leader answers, unlike a direct get): errNotFound if there is
// none.
func getStoredMsg(ctx context.Context, nc *nats.Conn, opts jetstream.JetStreamOptions, stream string, req msgGetRequest) (*storedMsg, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	prefix := opts.APIPrefix
	if prefix == "" {
		prefix = jetstream.DefaultAPIPrefix
	} else if !strings.HasSuffix(prefix, ".") {
		prefix += "."
	}
	msg, err := nc.RequestWithContext(ctx, prefix+"STREAM.MSG.GET."+stream, body)
	if err != nil {
		return nil, err
	}
	var resp struct {
		Error *struct {
			Code        int    `json:"code"`
			ErrCode     int    `json:"err_code"`
			Description string `json:"description"`
		} `json:"error"`
		Message *storedMsg `json:"message"`
	}
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		return nil, err
	}
	switch {
	case resp.Error != nil && resp.Error.ErrCode == int(jetstream.JSErrCodeMessageNotFound):
		return nil, errNotFound
	case resp.Error != nil:
		return nil, &jetstream.APIError{Code: resp.Error.Code, ErrorCode: jetstream.ErrorCode(resp.Error.ErrCode),
			Description: resp.Error.Description}
	case resp.Message == nil:
		return nil, fmt.Errorf("an empty answer")
	}
	return resp.Message, nil
}
