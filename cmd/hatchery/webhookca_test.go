package main

import (
	"context"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/store"
)

// --webhook-ca trusts the CA of a custom allocation webhook that the system
// does not (one on the operator's own network), besides the system's.
func TestWebhookCA(t *testing.T) {
	ctx := context.Background()
	webhook := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	defer webhook.Close()
	dir := t.TempDir()
	caPath := filepath.Join(dir, "webhook-ca.pem")
	if err := os.WriteFile(caPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: webhook.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenSQLite(filepath.Join(dir, "hatchery.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	o := serveOptions{host: "localhost", port: 8443}
	reach := func() error {
		t.Helper()
		_, d, err := openServices(ctx, o, st, "")
		if err != nil {
			t.Fatal(err)
		}
		c := d.Webhooks
		if c == nil {
			c = http.DefaultClient
		}
		resp, err := c.Get(webhook.URL)
		if err == nil {
			resp.Body.Close()
		}
		return err
	}
	if err := reach(); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("without --webhook-ca: %v", err)
	}
	o.webhookCA = caPath
	if err := reach(); err != nil {
		t.Fatalf("with --webhook-ca: %v", err)
	}
	o.webhookCA = filepath.Join(dir, "missing.pem")
	if _, _, err := openServices(ctx, o, st, ""); err == nil || !strings.Contains(err.Error(), "--webhook-ca") {
		t.Fatalf("a missing --webhook-ca: %v", err)
	}
}
