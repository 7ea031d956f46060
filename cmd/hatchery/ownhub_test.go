package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/store"
)

// Started again under another --hostname, the server's own hub stays
// linked, under the new name and with the settings it had; other hubs
// stay as they were.
func TestOwnHubFollowsHostname(t *testing.T) {
	ctx := context.Background()
	st, err := store.OpenSQLite(filepath.Join(t.TempDir(), "hatchery.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	start := func(host string) *dps.Service {
		h, err := hub.Open(ctx, st, host)
		if err != nil {
			t.Fatal(err)
		}
		d, err := dps.Open(ctx, st, nil, host)
		if err != nil {
			t.Fatal(err)
		}
		if err := linkOwnHub(ctx, d, h, 8443); err != nil {
			t.Fatal(err)
		}
		return d
	}
	d := start("old.example")
	other := dps.LinkedHub{HostName: "other.example", ConnectionString: "HostName=other.example;SharedAccessKeyName=iothubowner;SharedAccessKey=" + strings.Repeat("A", 43) + "=", AllocationWeight: 2}
	if err := d.LinkHub(ctx, other); err != nil {
		t.Fatal(err)
	}
	hubs, _ := d.LinkedHubs(ctx)
	for _, h := range hubs {
		if h.HostName == "old.example" {
			h.AllocationWeight = 7
			if err := d.LinkHub(ctx, *h); err != nil {
				t.Fatal(err)
			}
		}
	}

	for range 2 { // and again under the same name: nothing moves
		d = start("new.example")
		hubs, err := d.LinkedHubs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]*dps.LinkedHub{}
		for _, h := range hubs {
			got[h.HostName] = h
		}
		own := got["new.example"]
		if len(got) != 2 || own == nil || got["other.example"] == nil || own.AllocationWeight != 7 ||
			!strings.HasPrefix(own.ConnectionString, "HostName=new.example;") {
			t.Fatalf("linked hubs after the new --hostname: %+v", hubs)
		}
	}
}
