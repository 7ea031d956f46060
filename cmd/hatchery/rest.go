package main

import (
	"net/http"
	"sync"

	"github.com/spf13/cobra"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
)

// How the commands reach the installation's service APIs: clients made
// once per command, and the generic show, delete, modify and query verbs
// the enrollment, group, hub and device commands share.

// dpsClient reaches the provisioning service API of the installation in
// --data-dir, as an operator's tool would: over HTTPS with the owner policy.
// A variable so tests can point it at a server that fails on purpose.
var dpsClient = func(cmd *cobra.Command) (*azclient.Client, error) { return siteClient(cmd, provisioningAPI) }

// hubClient reaches the hub's service API with the iothubowner policy.
func hubClient(cmd *cobra.Command) (*azclient.Client, error) { return siteClient(cmd, hubAPI) }

// serviceAPI is one of the installation's service APIs.
type serviceAPI struct {
	apiVersion string
	connString func(*siteInfo) string
}

var (
	provisioningAPI = &serviceAPI{"2021-10-01", func(s *siteInfo) string { return s.ProvisioningServiceConnectionString }}
	hubAPI          = &serviceAPI{"2021-04-12", func(s *siteInfo) string { return s.HubConnectionString }}
)

// service is how a command reaches one of the installation's services.
type service func(*cobra.Command) (*azclient.Client, error)

// call sends one request and decodes the answer into a T.
func call[T any](cmd *cobra.Command, svc service, method, path, ifMatch string, in any) (*T, error) {
	c, err := svc(cmd)
	if err != nil {
		return nil, err
	}
	out := new(T)
	return out, c.Do(cmd.Context(), method, path, ifMatch, in, out)
}

// send sends one request whose answer does not matter.
func send(cmd *cobra.Command, svc service, method, path, ifMatch string, in any) error {
	c, err := svc(cmd)
	if err != nil {
		return err
	}
	return c.Do(cmd.Context(), method, path, ifMatch, in, nil)
}

// resource is one kind of thing a service keeps, as its show and delete
// commands see it.
type resource struct {
	svc   service
	path  func() string        // the resource's path, from the parsed flags
	flags func(*cobra.Command) // adds the flags that name it
	// ifMatch is what delete sends: "*" where the API requires If-Match.
	ifMatch string
}

// showCmd is `show`: the resource, fetched and presented by view.
func showCmd[T any](r resource, short string, view func(*cobra.Command, *T) error) *cobra.Command {
	c := &cobra.Command{Use: "show", Short: short, RunE: func(cmd *cobra.Command, _ []string) error {
		out, err := call[T](cmd, r.svc, "GET", r.path(), "", nil)
		if err != nil {
			return err
		}
		return view(cmd, out)
	}}
	r.flags(c)
	return c
}

// showWithKeys is showCmd for enrollments and groups, whose reads leave
// their symmetric keys out: --show-keys fetches them from the attestation
// mechanism, as `az iot dps enrollment show --show-keys` does.
func showWithKeys[T any](r resource, short string, att func(*T) *dps.Attestation, view func(*cobra.Command, *T) error) *cobra.Command {
	var keys bool
	c := showCmd(r, short, func(cmd *cobra.Command, v *T) error {
		if keys {
			a, err := call[dps.Attestation](cmd, r.svc, "POST", r.path()+"/attestationmechanism", "", nil)
			if err != nil {
				return err
			}
			*att(v) = *a
		}
		return view(cmd, v)
	})
	c.Flags().BoolVar(&keys, "show-keys", false, "include the symmetric keys")
	return c
}

// deleteCmd is `delete`.
func (r resource) deleteCmd(short string) *cobra.Command {
	c := &cobra.Command{Use: "delete", Short: short, RunE: func(cmd *cobra.Command, _ []string) error {
		return send(cmd, r.svc, "DELETE", r.path(), r.ifMatch, nil)
	}}
	r.flags(c)
	return c
}

// clients are the clients commands made, so that a command sending several
// requests loads the installation once and keeps its connection.
var clients = struct {
	sync.Mutex
	m map[clientKey]*azclient.Client
}{m: map[clientKey]*azclient.Client{}}

type clientKey struct {
	cmd *cobra.Command
	api *serviceAPI
}

func siteClient(cmd *cobra.Command, api *serviceAPI) (*azclient.Client, error) {
	clients.Lock()
	defer clients.Unlock()
	key := clientKey{cmd, api}
	if c := clients.m[key]; c != nil {
		return c, nil
	}
	site, err := loadSite(cmd)
	if err != nil {
		return nil, err
	}
	lb, err := site.loopback()
	if err != nil {
		return nil, err
	}
	c, err := azclient.New(api.connString(site), lb.url, api.apiVersion, lb.tls)
	if err == nil {
		clients.m[key] = c
	}
	return c, err
}

// modify reads what path names, edits it and writes it back under the
// ETag read, reading again when something changed it meanwhile: a change
// made between the read and the write (a key rotated, a status set) is
// never written over.
func modify[T any](cmd *cobra.Command, svc service, path string, etag func(*T) string, edit func(*T) error) (*T, error) {
	for attempt := 1; ; attempt++ {
		v, err := call[T](cmd, svc, "GET", path, "", nil)
		if err != nil {
			return nil, err
		}
		if err := edit(v); err != nil {
			return nil, err
		}
		out, err := call[T](cmd, svc, "PUT", path, etag(v), v)
		if azerr.HasStatus(err, http.StatusPreconditionFailed) && attempt < 5 {
			continue
		}
		return out, err
	}
}

// queryAll follows continuation tokens to the end.
func queryAll[T any](cmd *cobra.Command, svc service, path, query string) ([]*T, error) {
	c, err := svc(cmd)
	if err != nil {
		return nil, err
	}
	return azclient.QueryAll[T](cmd.Context(), c, path, query)
}
