package main

import (
	"context"
	"crypto/subtle"
	"log/slog"
	"strconv"
	"strings"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/sas"
)

// linkOwnHub links the hub of this process on first start (hubclient.Pool
// calls it in process: docs/decisions/0004). Started again under another
// --hostname, the hub keeps its keys but not its name: the link that
// carries its key under the former name moves to the new one, with its
// weight and settings, or every registration to it would fail.
func linkOwnHub(ctx context.Context, d *dps.Service, h *hub.Service, httpsPort int) error {
	hubs, err := d.LinkedHubs(ctx)
	if err != nil {
		return err
	}
	own := dps.LinkedHub{HostName: h.Host(), ConnectionString: h.OwnerConnectionString(),
		Endpoint: "https://127.0.0.1:" + strconv.Itoa(httpsPort), AllocationWeight: 1, ApplyAllocationPolicy: true}
	if len(hubs) == 0 {
		return d.LinkHub(ctx, own)
	}
	ownKey := ""
	if cs, err := sas.ParseConnectionString(own.ConnectionString); err == nil {
		ownKey = string(cs.Key)
	}
	for _, l := range hubs {
		if strings.EqualFold(l.HostName, own.HostName) {
			return nil
		}
	}
	for _, l := range hubs {
		cs, err := sas.ParseConnectionString(l.ConnectionString)
		if err != nil || subtle.ConstantTimeCompare(cs.Key, []byte(ownKey)) != 1 {
			continue
		}
		moved := *l
		moved.HostName, moved.ConnectionString, moved.Endpoint = own.HostName, own.ConnectionString, own.Endpoint
		if err := d.LinkHub(ctx, moved); err != nil {
			return err
		}
		// Another replica starting under the new name may have moved it first.
		if err := d.UnlinkHub(ctx, l.HostName); err != nil && !azerr.HasStatus(err, 404) {
			return err
		}
		slog.Warn("this server's hub was linked under its former --hostname, and is now linked under the new one; enrollments naming the former in iotHubs or iotHubHostName need the new name",
			"former", l.HostName, "hostname", own.HostName)
		return nil
	}
	return nil // the operator unlinked it, and linked other hubs
}
