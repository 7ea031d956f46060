package main

import (
	"archive/zip"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
	"github.com/spf13/cobra"

	"github.com/hatchery/hatchery/internal/edge/config"
	"github.com/hatchery/hatchery/internal/edge/moby"
	"github.com/hatchery/hatchery/internal/pki"
	"github.com/hatchery/hatchery/internal/tpmservice"
)

// checkResult is one line of `iotedge check`.
type checkResult struct {
	ID      string `json:"id"`
	Name    string `json:"name"`
	Result  string `json:"result"` // ok, warning, error, skipped
	Details string `json:"details,omitempty"`
}

// outcome is a check's result and what to do about it.
type outcome struct{ result, details string }

// runChecks diagnoses what the runtime depends on, each check on its own.
func runChecks(ctx context.Context) []checkResult {
	var out []checkResult
	add := func(id, name string, o outcome) {
		out = append(out, checkResult{ID: id, Name: name, Result: o.result, Details: o.details})
	}
	path := configPath()
	cfg, ws, err := config.Load(path)
	unreadable := errors.Is(err, fs.ErrPermission) // it may hold keys: root's and iotedged's alone
	switch {
	case unreadable:
		add("config-toml-well-formed", "config.toml is well-formed", outcome{"skipped", err.Error()})
	case err != nil:
		add("config-toml-well-formed", "config.toml is well-formed", outcome{"error", err.Error()})
	case len(ws) > 0:
		msg := ""
		for _, w := range ws {
			msg += w.String() + "\n"
		}
		add("config-toml-well-formed", "config.toml is well-formed", outcome{"warning", msg})
	default:
		add("config-toml-well-formed", "config.toml is well-formed", outcome{"ok", ""})
	}
	if cfg == nil {
		// Checking against defaults would report on a configuration the
		// runtime does not have.
		skip := outcome{"skipped", "config.toml cannot be used: " + err.Error()}
		if unreadable {
			skip = outcome{"skipped", "it needs config.toml, which this user may not read: run 'sudo iotedge check'"}
		}
		add("tpm", "TPM is reachable and permissions are right", skip)
		checkDaemon(ctx, add)
		add("hub-connectivity", "IoT hub is reachable over MQTT/TLS", skip)
		if _, serr := os.Stat(path); errors.Is(serr, fs.ErrNotExist) {
			// Without a file the runtime would use the default engine
			// socket, which a new device needs working.
			add("container-engine", "container engine is reachable", checkEngine(ctx, config.DefaultMobyURI))
		} else {
			add("container-engine", "container engine is reachable", skip)
		}
		return out
	}
	roots, _ := pki.Roots()
	if cfg.TrustBundleCert != "" {
		if withBundle, err := pki.Roots(config.FilePath(cfg.TrustBundleCert)); err != nil {
			add("trust-bundle", "trust bundle is readable", outcome{"error", fmt.Sprintf("trust_bundle_cert %s: %v", cfg.TrustBundleCert, err)})
		} else {
			roots = withBundle
		}
	}

	if cfg.Provisioning.Attestation.Method == config.MethodTPM {
		add("tpm", "TPM is reachable and permissions are right", checkTPM())
	} else {
		add("tpm", "TPM is reachable and permissions are right", outcome{"skipped", "the device does not use TPM attestation"})
	}

	if cert, key, ok := identityFiles(cfg); ok {
		add("identity-certificate", "the device's identity certificate and key load and are valid", checkIdentityCert(cert, key, time.Now()))
	}

	if cfg.Provisioning.Source == config.SourceDPS {
		u, err := url.Parse(cfg.Provisioning.GlobalEndpoint)
		if err != nil {
			add("dps-connectivity", "DPS endpoint is reachable over TLS", outcome{"error", err.Error()})
		} else {
			add("dps-connectivity", "DPS endpoint is reachable over TLS", tlsReach(ctx, u.Host, "443", roots))
			add("clock", "the clock is in step with the provisioning service", checkClock(ctx, u, roots))
		}
	}
	if hub := checkDaemon(ctx, add); hub == "" {
		add("hub-connectivity", "IoT hub is reachable over MQTT/TLS", outcome{"skipped", "the device has no hub yet"})
	} else {
		add("hub-connectivity", "IoT hub is reachable over MQTT/TLS at "+hub, tlsReach(ctx, hub, "8883", roots))
	}
	add("container-engine", "container engine is reachable", checkEngine(ctx, cfg.MobyRuntime.URI))
	return out
}

// checkEngine pings the container engine at uri.
func checkEngine(ctx context.Context, uri string) outcome {
	e, err := moby.New(uri)
	if err == nil {
		err = e.Ping(ctx)
	}
	if err != nil {
		return outcome{"error", err.Error()}
	}
	return outcome{"ok", ""}
}

// checkDaemon adds an error if the daemon does not answer, and returns the
// hub it connects to, "" if none.
func checkDaemon(ctx context.Context, add func(id, name string, o outcome)) (hub string) {
	c, err := mgmtClient()
	if err != nil {
		return ""
	}
	st, err := c.Status(ctx)
	if err != nil {
		add("daemon", "the IoT Edge daemon is running", outcome{"error", err.Error()})
		return ""
	}
	return st.HubAddress
}

// identityFiles are the X.509 identity of the configuration, if it has one.
func identityFiles(cfg *config.Config) (cert, key string, ok bool) {
	p := cfg.Provisioning
	switch {
	case p.Source == config.SourceDPS && p.Attestation.Method == config.MethodX509:
		return p.Attestation.IdentityCert, p.Attestation.IdentityPK, true
	case p.Source == config.SourceManual && p.Authentication.Method == config.MethodX509:
		return p.Authentication.IdentityCert, p.Authentication.IdentityPK, true
	}
	return "", "", false
}

// checkIdentityCert loads the pair and warns a week before it expires, as
// an expired identity certificate cuts the device off.
func checkIdentityCert(certURI, keyURI string, now time.Time) outcome {
	pair, err := tls.LoadX509KeyPair(config.FilePath(certURI), config.FilePath(keyURI))
	if err != nil {
		return outcome{"error", fmt.Sprintf("identity_cert %s and identity_pk %s: %v", certURI, keyURI, err)}
	}
	leaf := pair.Leaf
	switch {
	case now.Before(leaf.NotBefore):
		return outcome{"error", fmt.Sprintf("the identity certificate is not valid until %s: check the clock", leaf.NotBefore.UTC().Format(time.RFC3339))}
	case now.After(leaf.NotAfter):
		return outcome{"error", fmt.Sprintf("the identity certificate expired on %s: renew it", leaf.NotAfter.UTC().Format(time.RFC3339))}
	case now.Add(7 * 24 * time.Hour).After(leaf.NotAfter):
		return outcome{"warning", fmt.Sprintf("the identity certificate expires on %s: renew it soon", leaf.NotAfter.UTC().Format(time.RFC3339))}
	}
	return outcome{"ok", ""}
}

// checkTPM asks aziot-tpmd, the only process that opens the TPM, for the
// endorsement key: that proves the service runs, can open the TPM, and
// that the CLI's user may talk to it.
func checkTPM() outcome {
	if _, err := tpmservice.Dial(tpmSocket()).EndorsementKey(); err != nil {
		return outcome{"error", err.Error()}
	}
	return outcome{"ok", ""}
}

func tlsReach(ctx context.Context, host, port string, roots *x509.CertPool) outcome {
	h, p, err := net.SplitHostPort(host)
	if err != nil {
		h, p = host, port
	}
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second}, Config: &tls.Config{RootCAs: roots, ServerName: h}}
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(h, p))
	if err != nil {
		return outcome{"error", fmt.Sprintf("%s:%s: %v (check the network, the host name, and that trust_bundle_cert holds the server's CA)", h, p, err)}
	}
	conn.Close()
	return outcome{"ok", ""}
}

// checkClock compares the local clock with the provisioning service's
// Date header: tokens fail when they differ by minutes.
func checkClock(ctx context.Context, u *url.URL, roots *x509.CertPool) outcome {
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	req, _ := http.NewRequestWithContext(ctx, "GET", u.String(), nil)
	resp, err := client.Do(req)
	if err != nil {
		return outcome{"skipped", "the provisioning service did not answer"}
	}
	resp.Body.Close()
	t, err := http.ParseTime(resp.Header.Get("Date"))
	if err != nil {
		return outcome{"skipped", "the provisioning service sent no Date"}
	}
	if skew := time.Since(t); skew > 5*time.Minute || skew < -5*time.Minute {
		return outcome{"error", fmt.Sprintf("the clock is %s off the provisioning service's: set it (e.g. with timedatectl set-ntp true)", skew.Round(time.Second))}
	}
	return outcome{"ok", ""}
}

func newCheckCmd() *cobra.Command {
	var output string
	var verbose bool
	c := &cobra.Command{Use: "check", Short: "Diagnose configuration and connectivity", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(cmd.Context(), time.Minute)
			defer cancel()
			results := runChecks(ctx)
			failed := 0
			for _, r := range results {
				if r.Result == "error" {
					failed++
				}
			}
			if output == "json" {
				if err := printJSON(cmd.OutOrStdout(), map[string]any{"checks": results, "errors": failed}); err != nil {
					return err
				}
			} else {
				for _, r := range results {
					mark := map[string]string{"ok": "√", "warning": "‼", "error": "×", "skipped": "-"}[r.Result]
					fmt.Fprintf(cmd.OutOrStdout(), "%s %s - %s\n", mark, r.Name, r.Result)
					if r.Details != "" {
						fmt.Fprintf(cmd.OutOrStdout(), "    %s\n", r.Details)
					}
				}
			}
			if failed > 0 {
				return fmt.Errorf("%d check(s) failed", failed)
			}
			return nil
		}}
	c.Flags().StringVarP(&output, "output", "o", "text", "text or json")
	c.Flags().BoolVar(&verbose, "verbose", false, "as Azure's iotedge takes it; every check's details are shown anyway")
	return c
}

// redactedConfig is config.toml with every secret replaced, re-encoded from
// its parsed form so that no way of writing a value (inline tables, dotted
// keys, multi-line strings) slips through; a file that does not parse is
// left out, as nothing in it can be told apart.
func redactedConfig(data []byte) ([]byte, error) {
	var doc map[string]any
	if err := toml.Unmarshal(data, &doc); err != nil {
		return nil, errors.New("config.toml does not parse, so it is left out: run 'iotedge check' for where")
	}
	redact(doc)
	return toml.Marshal(doc)
}

func redact(v any) {
	switch v := v.(type) {
	case map[string]any:
		for k, e := range v {
			if s, ok := e.(string); slices.Contains(config.SecretKeys, k) || ok && hasKey(s) {
				v[k] = "<redacted>"
			} else {
				redact(e)
			}
		}
	case []any:
		for i, e := range v {
			if s, ok := e.(string); ok && hasKey(s) {
				v[i] = "<redacted>"
			} else {
				redact(e)
			}
		}
	}
}

func hasKey(s string) bool { return strings.Contains(strings.ToLower(s), "sharedaccesskey=") }

func newSupportBundleCmd() *cobra.Command {
	var out, since string
	c := &cobra.Command{Use: "support-bundle", Short: "Collect configuration, status, checks and logs into a zip file", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// Logs and status may still say more than the world should read.
			f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
			if err != nil {
				return err
			}
			defer f.Close()
			z := zip.NewWriter(f)
			now := time.Now()
			put := func(name string, write func(io.Writer) error) {
				w, err := z.CreateHeader(&zip.FileHeader{Name: name, Method: zip.Deflate, Modified: now})
				if err == nil {
					if err := write(w); err != nil {
						fmt.Fprintf(w, "\nerror: %v\n", err)
					}
				}
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), time.Minute)
			defer cancel()
			put("config.toml", func(w io.Writer) error {
				b, err := os.ReadFile(configPath())
				if errors.Is(err, fs.ErrPermission) {
					return fmt.Errorf("%w: it may hold the device's keys; run 'sudo iotedge support-bundle' to include it, secrets redacted", err)
				}
				if err == nil {
					b, err = redactedConfig(b)
				}
				if err != nil {
					return err
				}
				_, err = w.Write(b)
				return err
			})
			put("check.json", func(w io.Writer) error { return printJSON(w, runChecks(ctx)) })
			client, err := mgmtClient()
			if err == nil {
				put("status.json", func(w io.Writer) error {
					st, err := client.Status(ctx)
					if err != nil {
						return err
					}
					return printJSON(w, st)
				})
				put("logs/iotedged.log", func(w io.Writer) error {
					body, err := client.Logs(ctx, "5000", false)
					if err != nil {
						return err
					}
					defer body.Close()
					_, err = io.Copy(w, body)
					return err
				})
				if ms, err := client.Modules(ctx); err == nil {
					for _, m := range ms {
						if m.Name == "edgeAgent" {
							continue // its log is iotedged's, above
						}
						put("logs/"+m.Name+".log", func(w io.Writer) error {
							body, err := client.ModuleLogs(ctx, m.Name, "1000", since, "", false)
							if err != nil {
								return err
							}
							defer body.Close()
							_, err = io.Copy(w, body)
							return err
						})
					}
				}
			}
			if err := z.Close(); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Wrote %s\n", out)
			return nil
		}}
	c.Flags().StringVarP(&out, "output", "o", "support_bundle.zip", "the zip file to write")
	c.Flags().StringVar(&since, "since", "1 day", "modules' log lines since a time (RFC 3339, Unix) or a duration back from now (90 minutes, 6h); the daemon's log gives its last 5000 lines")
	return c
}
