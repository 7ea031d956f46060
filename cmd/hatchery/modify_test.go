package main

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/spf13/cobra"

	"github.com/hatchery/hatchery/internal/azclient"
)

// A change made between modify's read and its write (a key rotated right
// after the read) is read again and kept, not written over.
func TestModifyKeepsAConcurrentChange(t *testing.T) {
	type device struct {
		Status string `json:"status"`
		Key    string `json:"key"`
		ETag   string `json:"etag"`
	}
	var mu sync.Mutex
	doc := device{Status: "enabled", Key: "old", ETag: "1"}
	var ifMatch []string
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		switch r.Method {
		case "GET":
			_ = json.NewEncoder(w).Encode(doc)
			if doc.ETag == "1" {
				doc.Key, doc.ETag = "new", "2"
			}
		case "PUT":
			ifMatch = append(ifMatch, strings.Trim(r.Header.Get("If-Match"), `"`))
			if ifMatch[len(ifMatch)-1] != doc.ETag {
				w.WriteHeader(http.StatusPreconditionFailed)
				_, _ = w.Write([]byte(`{"errorCode":412001,"message":"the etag does not match"}`))
				return
			}
			_ = json.NewDecoder(r.Body).Decode(&doc)
			doc.ETag = "3"
			_ = json.NewEncoder(w).Encode(doc)
		}
	}))
	defer srv.Close()
	tlsConf := srv.Client().Transport.(*http.Transport).TLSClientConfig
	svc := func(*cobra.Command) (*azclient.Client, error) {
		return azclient.New("HostName=hub;SharedAccessKeyName=owner;SharedAccessKey=MDEyMzQ1Njc4OWFiY2RlZg==", srv.URL, "2021-04-12", tlsConf)
	}
	cmd := &cobra.Command{}
	cmd.SetContext(context.Background())

	out, err := modify(cmd, svc, "/devices/d1", func(d *device) string { return d.ETag },
		func(d *device) error { d.Status = "disabled"; return nil })
	if err != nil {
		t.Fatal(err)
	}
	if doc.Key != "new" || doc.Status != "disabled" || out.ETag != "3" {
		t.Errorf("stored %+v, answered %+v: want the rotated key kept and the status set", doc, out)
	}
	if !slices.Equal(ifMatch, []string{"1", "2"}) {
		t.Errorf("PUTs sent If-Match %q, want the ETag of each read: 1, then 2", ifMatch)
	}
}
