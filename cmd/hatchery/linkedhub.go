package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/url"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hubclient"
)

// hubCmd manages the hubs the provisioning service assigns devices to (as
// `az iot dps linked-hub`).
func hubCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "hub", Short: "Link the IoT hubs devices are assigned to (as `az iot dps linked-hub`)"}
	var host, connString, endpoint, caPath string
	var weight int
	var apply, clearLatency bool
	var latency map[string]string
	link := &cobra.Command{Use: "link", Short: "Link a hub, or change a linked one", RunE: func(cmd *cobra.Command, _ []string) error {
		changed := cmd.Flags().Changed
		// Changing a linked hub starts from its settings, so that a new
		// connection string (a rotated key) leaves the others as they are;
		// without one, the service keeps its key.
		hubs, err := call[[]*dps.LinkedHub](cmd, dpsClient, "GET", "/linkedHubs", "", nil)
		if err != nil {
			return err
		}
		var h *dps.LinkedHub
		for _, old := range *hubs {
			if strings.EqualFold(old.HostName, host) {
				h = old
			}
		}
		switch {
		case h == nil && !changed("connection-string"):
			return fmt.Errorf("hub %s is not linked: link it with --connection-string", host)
		case h == nil:
			h = &dps.LinkedHub{HostName: host, AllocationWeight: 1, ApplyAllocationPolicy: true}
		}
		if changed("connection-string") {
			h.ConnectionString = connString
		}
		if changed("endpoint") {
			h.Endpoint = endpoint
		}
		if changed("ca-cert") {
			pem, err := os.ReadFile(caPath)
			if err != nil {
				return fmt.Errorf("--ca-cert: %w", err)
			}
			h.CACertificate = string(pem)
		}
		if changed("allocation-weight") {
			h.AllocationWeight = weight
		}
		if changed("apply-allocation-policy") {
			h.ApplyAllocationPolicy = apply
		}
		if clearLatency {
			if changed("latency") {
				return fmt.Errorf("give --latency or --clear-latency, not both")
			}
			h.LatencyMs = nil
		}
		if changed("latency") {
			h.LatencyMs = map[string]int{}
			for network, v := range latency {
				ms, err := strconv.Atoi(strings.TrimSuffix(v, "ms"))
				if err != nil {
					return fmt.Errorf("--latency %s=%s: give milliseconds, e.g. 10.1.0.0/16=20", network, v)
				}
				h.LatencyMs[network] = ms
			}
		}
		out, err := call[dps.LinkedHub](cmd, dpsClient, "PUT", "/linkedHubs/"+url.PathEscape(host), "", h)
		if err != nil {
			return err
		}
		if changed("connection-string") {
			ctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Second)
			defer cancel()
			probe := &hubclient.Pool{TLS: &tls.Config{MinVersion: tls.VersionTLS12}} // the system's CAs, and --ca-cert
			if err := probe.Check(ctx, *h); err != nil {
				fmt.Fprintf(cmd.ErrOrStderr(), "warning: from this machine, hub %s does not take its connection string (%v): "+
					"devices allocated to it will fail until it does; check --connection-string, --endpoint and --ca-cert\n", host, err)
			}
		}
		return renderHubs(cmd, []*dps.LinkedHub{out})
	}}
	link.Flags().StringVar(&host, "hostname", "", "the hub's host name, as devices reach it")
	link.Flags().StringVar(&connString, "connection-string", "", "the hub's connection string (iothubowner, or a policy with RegistryWrite and ServiceConnect); omit to change a linked hub's settings")
	link.Flags().StringVar(&endpoint, "endpoint", "", "the registry's URL when not https://HOSTNAME (another port)")
	link.Flags().StringVar(&caPath, "ca-cert", "", "PEM of the CA that signed the hub's TLS certificate, when the system does not trust it (another hatchery serve: its tls/ca.pem)")
	link.Flags().IntVar(&weight, "allocation-weight", 1, "the hub's share of devices under hashed allocation, 1 to 1000 (0 means the default, 1)")
	link.Flags().BoolVar(&apply, "apply-allocation-policy", true, "allocate to this hub devices whose enrollment names no hubs")
	link.Flags().StringToStringVar(&latency, "latency", nil, "geoLatency table: NETWORK=MS pairs, the latency from devices in each network to this hub, e.g. 10.1.0.0/16=20")
	link.Flags().BoolVar(&clearLatency, "clear-latency", false, "drop the hub's geoLatency table")
	_ = link.MarkFlagRequired("hostname")

	unlink := &cobra.Command{Use: "unlink", Short: "Unlink a hub (its devices stay there)", RunE: func(cmd *cobra.Command, _ []string) error {
		if err := send(cmd, dpsClient, "DELETE", "/linkedHubs/"+url.PathEscape(host), "", nil); err != nil {
			return err
		}
		// The hub is unlinked: a scan that fails leaves only the warning
		// unsaid, and a retry would find the hub gone.
		if err := warnNamingHub(cmd, host); err != nil {
			fmt.Fprintf(cmd.ErrOrStderr(), "warning: hub %s is unlinked, but whether enrollments still name it could not be checked (%v): "+
				"look with `hatchery enrollment list` and `hatchery enrollment-group list`\n", host, err)
		}
		return nil
	}}
	unlink.Flags().StringVar(&host, "hostname", "", "the linked hub's host name")
	_ = unlink.MarkFlagRequired("hostname")

	list := &cobra.Command{Use: "list", Short: "List the linked hubs", RunE: func(cmd *cobra.Command, _ []string) error {
		hubs, err := call[[]*dps.LinkedHub](cmd, dpsClient, "GET", "/linkedHubs", "", nil)
		if err != nil {
			return err
		}
		return renderHubs(cmd, *hubs)
	}}
	cmd.AddCommand(link, unlink, list)
	return cmd
}

func renderHubs(cmd *cobra.Command, hubs []*dps.LinkedHub) error {
	rows := make([][]string, 0, len(hubs))
	for _, h := range hubs {
		var lat []string
		for network, ms := range h.LatencyMs {
			lat = append(lat, network+"="+strconv.Itoa(ms)+"ms")
		}
		sort.Strings(lat)
		rows = append(rows, []string{h.HostName, strconv.Itoa(max(h.AllocationWeight, 1)), strconv.FormatBool(h.ApplyAllocationPolicy), orDash(strings.Join(lat, ","))})
	}
	return renderTable(cmd, hubs, []string{"HOST NAME", "WEIGHT", "APPLY ALLOCATION", "LATENCY"}, rows)
}

// namingCap bounds the count of enrollments warnNamingHub reports: the
// scan stops once it found that many. With fewer it pages through every
// enrollment and group.
const namingCap = 1000

// warnNamingHub warns when enrollments or groups still name an unlinked
// hub: their devices fail to register until they are changed.
func warnNamingHub(cmd *cobra.Command, host string) error {
	enrollments, err := countNaming(cmd, "/enrollments/query", host, enrollmentShared)
	if err != nil {
		return err
	}
	groups, err := countNaming(cmd, "/enrollmentGroups/query", host, groupShared)
	if err != nil {
		return err
	}
	var named []string
	for _, c := range []struct {
		n          int
		one, other string
	}{{enrollments, "enrollment", "enrollments"}, {groups, "enrollment group", "enrollment groups"}} {
		switch {
		case c.n >= namingCap:
			named = append(named, fmt.Sprintf("at least %d %s", namingCap, c.other))
		case c.n == 1:
			named = append(named, "1 "+c.one)
		case c.n > 1:
			named = append(named, fmt.Sprintf("%d %s", c.n, c.other))
		}
	}
	if len(named) > 0 {
		fmt.Fprintf(cmd.ErrOrStderr(), "warning: %s still name hub %s (iotHubHostName or iotHubs): their devices cannot be assigned there; "+
			"change them (update --iot-hubs or --allocation-policy) or link the hub again\n", strings.Join(named, " and "), host)
	}
	return nil
}

// countNaming counts, up to namingCap, the enrollments or groups that
// query path lists whose allocation names host.
func countNaming[T any](cmd *cobra.Command, path, host string, fields func(*T) shared) (int, error) {
	c, err := dpsClient(cmd)
	if err != nil {
		return 0, err
	}
	n := 0
	err = azclient.QueryPages(cmd.Context(), c, path, "*", func(page []*T) bool {
		for _, v := range page {
			sh := fields(v)
			if strings.EqualFold(*sh.hub, host) || slices.ContainsFunc(*sh.hubs, func(h string) bool { return strings.EqualFold(h, host) }) {
				n++
			}
		}
		return n < namingCap
	})
	return n, err
}
