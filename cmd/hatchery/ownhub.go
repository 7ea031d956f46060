package main

import (
	"context"
	"log/slog"
	"strconv"

	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
)

// linkOwnHub links the hub of this process (hubclient.Pool calls it in
// process: docs/decisions/0004), and says so when a new --hostname moved
// its link.
func linkOwnHub(ctx context.Context, d *dps.Service, h *hub.Service, httpsPort int) error {
	former, err := d.KeepOwnHubLinked(ctx, dps.LinkedHub{HostName: h.Host(), ConnectionString: h.OwnerConnectionString(),
		Endpoint: "https://127.0.0.1:" + strconv.Itoa(httpsPort), AllocationWeight: 1, ApplyAllocationPolicy: true})
	if former != "" {
		slog.Warn("this server's hub was linked under its former --hostname, and is now linked under the new one; enrollments naming the former in iotHubs or iotHubHostName need the new name",
			"former", former, "hostname", h.Host())
	}
	return err
}
