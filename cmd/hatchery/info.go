package main

import (
	"cmp"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/pki"
	"github.com/hatchery/hatchery/internal/store"
)

// siteInfo is what a device or operator needs to use this installation.
type siteInfo struct {
	IDScope                             string `json:"idScope"`
	ProvisioningHost                    string `json:"provisioningHost"`
	ProvisioningServiceConnectionString string `json:"provisioningServiceConnectionString"`
	HubHostName                         string `json:"hubHostName"`
	HubMQTTPort                         int    `json:"hubMqttPort"`
	HubConnectionString                 string `json:"hubConnectionString"`
	// Least-privilege policies: twins, methods and messages; identities.
	HubServiceConnectionString  string `json:"hubServiceConnectionString"`
	HubRegistryConnectionString string `json:"hubRegistryConnectionString"`
	CACertificate               string `json:"caCertificate"`
	ServiceEndpoint             string `json:"serviceEndpoint"`
	// The certificate the server presents now (info asks it), for the
	// names devices may use and when it must be replaced.
	ServerCertificate *servedCertificate `json:"serverCertificate,omitempty"`

	listen string // the server's --listen address, "" for all
}

type servedCertificate struct {
	Names   []string  `json:"names"`
	Expires time.Time `json:"expires"`
}

// served asks the server on this machine for the certificate it presents;
// nil when it does not answer. The handshake only reads the certificate,
// so it is not verified here.
func (s *siteInfo) served() *servedCertificate {
	ep, err := url.Parse(s.ServiceEndpoint)
	if err != nil {
		return nil
	}
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 2 * time.Second}, Config: &tls.Config{InsecureSkipVerify: true, ServerName: ep.Hostname()}}
	conn, err := d.Dial("tcp", s.local(portOf(ep)))
	if err != nil {
		return nil
	}
	defer conn.Close()
	certs := conn.(*tls.Conn).ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return nil
	}
	leaf := certs[0]
	names := slices.Clone(leaf.DNSNames)
	for _, ip := range leaf.IPAddresses {
		// A certificate for an IP address may name it as a DNS name too.
		if !slices.Contains(names, ip.String()) {
			names = append(names, ip.String())
		}
	}
	return &servedCertificate{Names: names, Expires: leaf.NotAfter.UTC()}
}

// openSite reads the installation in the data directory, as left by
// `serve`, and opens its store: the SQLite file there, or the PostgreSQL
// database --database names, which a server on PostgreSQL needs.
func openSite(cmd *cobra.Command) (*endpoint, store.Store, error) {
	dir, _ := cmd.Flags().GetString("data-dir")
	if !cmd.Flags().Changed("data-dir") && os.Getenv("HATCHERY_DATA_DIR") == "" && !isPackagedDataDir(dir) {
		if _, err := os.Stat(filepath.Join(packagedDataDir, endpointFile)); err == nil {
			fmt.Fprintf(cmd.ErrOrStderr(), "note: using %s; the hatchery service's installation is %s (--data-dir %s)\n", dir, packagedDataDir, packagedDataDir)
		}
	}
	raw, err := readEndpoint(cmd, dir)
	switch {
	case errors.Is(err, fs.ErrPermission):
		return nil, nil, fmt.Errorf("the installation in %s is not yours to read (%v): run the command as root, or as the user who serves it", dir, err)
	case err != nil && database(cmd) != "":
		// The database holds the state; the endpoint and the CA that
		// vouches for it are a replica's files.
		return nil, nil, fmt.Errorf("no Hatchery installation in %s (%v): with --database, run the command beside a replica, "+
			"with its --data-dir (its endpoint.json and tls/ say where and how to reach the service)", dir, err)
	case err != nil:
		return nil, nil, fmt.Errorf("no Hatchery installation in %s (%v): start `hatchery serve --data-dir %s` first", dir, err, dir)
	}
	var ep endpoint
	if err := json.Unmarshal(raw, &ep); err != nil {
		return nil, nil, fmt.Errorf("%s is corrupt: %v", filepath.Join(dir, endpointFile), err)
	}
	dsn := database(cmd)
	if ep.ExternalDatabase && dsn == "" && isPackagedDataDir(dir) {
		// The package's service's URL, which sudo does not pass on from
		// an operator's shell.
		dsn = envFileValue(packagedDefaults, "HATCHERY_DATABASE")
	}
	if ep.ExternalDatabase && dsn == "" {
		return nil, nil, fmt.Errorf("the server of %s keeps its state in PostgreSQL: pass the same --database (or set HATCHERY_DATABASE)", dir)
	}
	st, err := store.OpenCurrent(cmd.Context(), dsn, dir)
	if err != nil {
		return nil, nil, err
	}
	return &ep, st, nil
}

// loadSite reads the installation in dataDir, as left by `serve`.
func loadSite(cmd *cobra.Command) (*siteInfo, error) {
	ep, st, err := openSite(cmd)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	d, err := dps.Open(cmd.Context(), st, nil, ep.HostName)
	if err != nil {
		return nil, err
	}
	h, err := hub.Open(cmd.Context(), st, ep.HostName)
	if err != nil {
		return nil, err
	}
	service, _ := h.PolicyConnectionString("service")
	registry, _ := h.PolicyConnectionString("registryReadWrite")
	return &siteInfo{
		IDScope:                             d.IDScope(),
		ProvisioningHost:                    ep.url(),
		ProvisioningServiceConnectionString: d.OwnerConnectionString(),
		HubHostName:                         h.Host(),
		HubMQTTPort:                         cmp.Or(ep.MQTTPort, 8883),
		HubConnectionString:                 h.OwnerConnectionString(),
		HubServiceConnectionString:          service,
		HubRegistryConnectionString:         registry,
		CACertificate:                       ep.CACert,
		ServiceEndpoint:                     ep.url(),
		listen:                              ep.Listen,
	}, nil
}

func infoCmd() *cobra.Command {
	var caPEM bool
	cmd := &cobra.Command{
		Use:   "info",
		Short: "Print the ID scope, endpoints, connection strings and CA certificate path",
		Example: `  hatchery info
  sudo hatchery info --ca-pem | ssh edge-01 'sudo tee /etc/aziot/hatchery-ca.pem'`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			info, err := loadSite(cmd)
			if err != nil {
				return err
			}
			if caPEM {
				if info.CACertificate == "" {
					return errors.New("there is no CA certificate to give devices: the server's --tls-cert chains to the system's CAs")
				}
				b, err := os.ReadFile(info.CACertificate)
				if err != nil {
					return err
				}
				_, err = cmd.OutOrStdout().Write(b)
				return err
			}
			ca := info.CACertificate
			if ca == "" {
				ca = "none needed: --tls-cert chains to the system's CAs (else serve with --tls-ca)"
			}
			served := "the server does not answer on this machine"
			if info.ServerCertificate = info.served(); info.ServerCertificate != nil {
				served = strings.Join(info.ServerCertificate.Names, ", ") + "; expires " + info.ServerCertificate.Expires.Format("2006-01-02")
			}
			return render(cmd, info, [][2]string{
				{"ID scope", info.IDScope},
				{"Provisioning endpoint (global_endpoint)", info.ProvisioningHost},
				{"Provisioning service connection string", info.ProvisioningServiceConnectionString},
				{"Hub host name", info.HubHostName},
				{"Hub MQTT port", strconv.Itoa(info.HubMQTTPort)},
				{"Hub connection string", info.HubConnectionString},
				{"Hub service connection string", info.HubServiceConnectionString},
				{"Hub registry connection string", info.HubRegistryConnectionString},
				{"CA certificate (trust_bundle_cert)", ca},
				{"Server certificate", served},
			})
		},
	}
	cmd.Flags().BoolVar(&caPEM, "ca-pem", false, "print the CA certificate devices trust (PEM), to copy to them, instead")
	return cmd
}

// loopback is how the CLI and the load tools reach the installation's
// server on this machine: the address it listens on (127.0.0.1 when it
// listens on all), trusting its CA, with the host name it serves — which
// need not resolve here (split DNS, a name only devices use).
type loopback struct {
	url   string // https://127.0.0.1:PORT
	tls   *tls.Config
	caPEM []byte
}

// local is the server's address on this machine, on port.
func (s *siteInfo) local(port string) string {
	host := s.listen
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

func (s *siteInfo) loopback() (*loopback, error) {
	ep, err := url.Parse(s.ServiceEndpoint)
	if err != nil {
		return nil, err
	}
	roots, err := s.roots()
	if err != nil {
		return nil, err
	}
	var caPEM []byte // for the load tools' worker processes
	if s.CACertificate != "" {
		caPEM, _ = os.ReadFile(s.CACertificate)
	}
	return &loopback{url: "https://" + s.local(portOf(ep)), caPEM: caPEM,
		tls: &tls.Config{RootCAs: roots, ServerName: ep.Hostname(), MinVersion: tls.VersionTLS12}}, nil
}

// portOf is u's port, 443 when it names none.
func portOf(u *url.URL) string {
	if p := u.Port(); p != "" {
		return p
	}
	return "443"
}

// roots is what the CLI trusts for the server's certificate: its CA alone,
// so that no other CA's certificate for the host name receives the owner
// tokens the CLI sends; the system's CAs for a --tls-cert without --tls-ca.
func (s *siteInfo) roots() (*x509.CertPool, error) {
	if s.CACertificate == "" {
		return pki.Roots()
	}
	return pki.Pool(s.CACertificate)
}

// startWait bounds how long a command waits for a server that is starting.
const startWait = time.Minute

// readEndpoint reads the data directory's endpoint.json, waiting for a
// server that holds the directory but has not written it yet: one just
// started (`make run &`, then a command) is not yet serving.
func readEndpoint(cmd *cobra.Command, dir string) ([]byte, error) {
	path := filepath.Join(dir, endpointFile)
	raw, err := os.ReadFile(path)
	if !errors.Is(err, fs.ErrNotExist) {
		return raw, err
	}
	pid, starting := lockHeld(filepath.Join(dir, serveLock))
	if !starting {
		return nil, err
	}
	fmt.Fprintf(cmd.ErrOrStderr(), "waiting for the server starting in %s (pid %s)...\n", dir, pid)
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	timeout := time.After(startWait)
	for {
		select {
		case <-cmd.Context().Done():
			return nil, cmd.Context().Err()
		case <-timeout:
			return nil, fmt.Errorf("the server in %s (pid %s) has not finished starting after %s: its log says why", dir, pid, startWait)
		case <-tick.C:
		}
		if raw, err = os.ReadFile(path); !errors.Is(err, fs.ErrNotExist) {
			return raw, err
		}
		if _, starting := lockHeld(filepath.Join(dir, serveLock)); !starting {
			return nil, fmt.Errorf("the server in %s (pid %s) stopped before it finished starting: its log says why", dir, pid)
		}
	}
}
