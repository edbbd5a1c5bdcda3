package mototest

import (
	"bytes"
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/awsapi"
)

// PutSecret keeps value in moto's Secrets Manager as secret name (in
// Region), as an operator keeps DSS's AWS key there.
func (s *Server) PutSecret(t testing.TB, name, value string) {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"Name": name, "SecretString": value})
	req, err := http.NewRequest(http.MethodPost, s.URL+"/", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-amz-json-1.1")
	req.Header.Set("X-Amz-Target", "secretsmanager.CreateSecret")
	awsapi.Sign(req, body, awsapi.Credentials{AccessKeyID: "AKIDEXAMPLE", SecretAccessKey: "moto"}, Region, "secretsmanager", time.Now())
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("keep secret %s in moto: %s", name, resp.Status)
	}
}
