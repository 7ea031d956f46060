package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/twindoc"
)

// identityPath is the registry path of a device or one of its modules.
func identityPath(prefix, device, module string) string {
	p := prefix + url.PathEscape(device)
	if module != "" {
		p += "/modules/" + url.PathEscape(module)
	}
	return p
}

// jsonFlag parses a JSON object given on the command line.
func jsonFlag(name, value string) (map[string]any, error) {
	var m map[string]any
	if err := twindoc.Unmarshal([]byte(value), &m); err != nil {
		return nil, fmt.Errorf("--%s is not a JSON object (%v): write it like '{\"environment\":\"prod\"}'", name, err)
	}
	return m, nil
}

func deviceCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "device", Short: "Manage device identities in the hub (as `az iot hub device-identity`)"}
	var id, authMethod, primaryTP, secondaryTP string
	var edge bool
	idFlag := func(c *cobra.Command) {
		c.Flags().StringVar(&id, "device-id", "", "the device's ID")
		_ = c.MarkFlagRequired("device-id")
	}
	show := func(cmd *cobra.Command, d *hub.Device) error {
		rows := [][2]string{
			{"Device ID", d.DeviceID}, {"Status", d.Status}, {"IoT Edge", strconv.FormatBool(d.Capabilities.IoTEdge)},
			{"Authentication", d.Authentication.Type}, {"Connection state", d.ConnectionState},
		}
		switch a := d.Authentication; {
		case a.Type == "sas":
			rows = append(rows, [2]string{"Primary key", a.SymmetricKey.PrimaryKey})
		case a.X509Thumbprint.PrimaryThumbprint != nil:
			rows = append(rows, [2]string{"Primary thumbprint", *a.X509Thumbprint.PrimaryThumbprint})
		}
		return render(cmd, d, rows)
	}
	create := &cobra.Command{Use: "create", Short: "Create a device with generated keys", RunE: func(cmd *cobra.Command, _ []string) error {
		in := hub.Device{DeviceID: id, Capabilities: hub.Capabilities{IoTEdge: edge}}
		switch authMethod {
		case "shared_private_key":
		case "x509_thumbprint":
			in.Authentication.Type = "selfSigned"
			in.Authentication.X509Thumbprint = hub.X509Thumbprint{PrimaryThumbprint: &primaryTP, SecondaryThumbprint: &secondaryTP}
		case "x509_ca":
			in.Authentication.Type = "certificateAuthority"
		default:
			return fmt.Errorf("--auth-method %q: use shared_private_key, x509_thumbprint or x509_ca", authMethod)
		}
		d, err := call[hub.Device](cmd, hubClient, "PUT", identityPath("/devices/", id, ""), "", in)
		if err != nil {
			return err
		}
		return show(cmd, d)
	}}
	idFlag(create)
	create.Flags().BoolVar(&edge, "edge-enabled", false, "the device is an IoT Edge device")
	create.Flags().StringVar(&authMethod, "auth-method", "shared_private_key", "shared_private_key, x509_thumbprint or x509_ca")
	create.Flags().StringVar(&primaryTP, "primary-thumbprint", "", "with x509_thumbprint: the SHA-1 or SHA-256 thumbprint of the device's certificate")
	create.Flags().StringVar(&secondaryTP, "secondary-thumbprint", "", "with x509_thumbprint: a second thumbprint")
	device := resource{svc: hubClient, path: func() string { return identityPath("/devices/", id, "") }, flags: idFlag, ifMatch: "*"}
	get := showCmd(device, "Show a device", show)
	del := device.deleteCmd("Delete a device and its modules")
	setStatus := func(use, status, short string) *cobra.Command {
		c := &cobra.Command{Use: use, Short: short, RunE: func(cmd *cobra.Command, _ []string) error {
			d, err := modify(cmd, hubClient, device.path(), func(d *hub.Device) string { return d.ETag },
				func(d *hub.Device) error { d.Status = status; return nil })
			if err != nil {
				return err
			}
			return show(cmd, d)
		}}
		idFlag(c)
		return c
	}
	var keyName string
	connString := &cobra.Command{Use: "connection-string", Short: "Print a device's connection string (as `az iot hub device-identity connection-string show`)",
		RunE: func(cmd *cobra.Command, _ []string) error {
			if keyName != "primary" && keyName != "secondary" {
				return fmt.Errorf("--key %q: use primary or secondary", keyName)
			}
			d, err := call[hub.Device](cmd, hubClient, "GET", device.path(), "", nil)
			if err != nil {
				return err
			}
			site, err := loadSite(cmd)
			if err != nil {
				return err
			}
			cs := "HostName=" + site.HubHostName + ";DeviceId=" + d.DeviceID
			switch a := d.Authentication; {
			case a.Type == "sas" && keyName == "primary":
				cs += ";SharedAccessKey=" + a.SymmetricKey.PrimaryKey
			case a.Type == "sas":
				cs += ";SharedAccessKey=" + a.SymmetricKey.SecondaryKey
			case a.Type != "selfSigned" && a.Type != "certificateAuthority":
				return fmt.Errorf("device %s has no credentials (authentication type %q): it has no connection string", d.DeviceID, a.Type)
			case cmd.Flags().Changed("key"):
				return fmt.Errorf("device %s authenticates with a certificate, not a key: leave out --key", d.DeviceID)
			default:
				cs += ";x509=true" // the device's certificate authenticates it
			}
			if jsonOutput(cmd) {
				return printJSON(map[string]string{"connectionString": cs})
			}
			fmt.Fprintln(cmd.OutOrStdout(), cs)
			return nil
		}}
	idFlag(connString)
	connString.Flags().StringVar(&keyName, "key", "primary", "the key it carries: primary or secondary")
	list := &cobra.Command{Use: "list", Short: "List devices", RunE: func(cmd *cobra.Command, _ []string) error {
		ds, err := queryAll[hub.Twin](cmd, hubClient, "/devices/query", "SELECT * FROM devices")
		if err != nil {
			return err
		}
		rows := make([][]string, 0, len(ds))
		for _, d := range ds {
			rows = append(rows, []string{d.DeviceID, d.Status, strconv.FormatBool(d.Capabilities.IoTEdge), d.ConnectionState})
		}
		return renderTable(cmd, ds, []string{"DEVICE ID", "STATUS", "EDGE", "CONNECTION"}, rows)
	}}
	cmd.AddCommand(create, get, del, list, connString,
		setStatus("disable", "disabled", "Disable a device: it can no longer connect"),
		setStatus("enable", "enabled", "Enable a device"))
	return cmd
}

func queryCmd() *cobra.Command {
	var q string
	cmd := &cobra.Command{Use: "query", Short: "Query the hub's twins with the IoT Hub query language (as `az iot hub query`)",
		Example: `  hatchery query -q "SELECT * FROM devices WHERE tags.environment = 'prod'"
  hatchery query -q "SELECT COUNT() AS n FROM devices WHERE connectionState = 'Connected'"`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rows, err := queryAll[json.RawMessage](cmd, hubClient, "/devices/query", q)
			if err != nil {
				return err
			}
			return printJSON(rows)
		}}
	cmd.Flags().StringVarP(&q, "query-command", "q", "", "the query")
	_ = cmd.MarkFlagRequired("query-command")
	return cmd
}

func twinCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "twin", Short: "Show and update device and module twins (as `az iot hub device-twin`)"}
	var id, module, tags, desired string
	flags := func(c *cobra.Command) {
		c.Flags().StringVar(&id, "device-id", "", "the device's ID")
		c.Flags().StringVar(&module, "module-id", "", "a module of the device")
		_ = c.MarkFlagRequired("device-id")
	}
	show := &cobra.Command{Use: "show", Short: "Show a twin", RunE: func(cmd *cobra.Command, _ []string) error {
		t, err := call[json.RawMessage](cmd, hubClient, "GET", identityPath("/twins/", id, module), "", nil)
		if err != nil {
			return err
		}
		return printJSON(t)
	}}
	flags(show)
	update := &cobra.Command{Use: "update", Short: "Merge tags and desired properties into a twin", RunE: func(cmd *cobra.Command, _ []string) error {
		patch := map[string]any{}
		if cmd.Flags().Changed("tags") {
			m, err := jsonFlag("tags", tags)
			if err != nil {
				return err
			}
			patch["tags"] = m
		}
		if cmd.Flags().Changed("desired") {
			m, err := jsonFlag("desired", desired)
			if err != nil {
				return err
			}
			patch["properties"] = map[string]any{"desired": m}
		}
		if len(patch) == 0 {
			return fmt.Errorf("nothing to update: give --tags and/or --desired")
		}
		t, err := call[json.RawMessage](cmd, hubClient, "PATCH", identityPath("/twins/", id, module), "*", patch)
		if err != nil {
			return err
		}
		return printJSON(t)
	}}
	flags(update)
	update.Flags().StringVar(&tags, "tags", "", `tags to merge, as JSON ('{"environment":"prod"}'; null removes a tag)`)
	update.Flags().StringVar(&desired, "desired", "", "desired properties to merge, as JSON")
	cmd.AddCommand(show, update)
	return cmd
}

func methodCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "method", Short: "Invoke direct methods"}
	var id, module, name, payload string
	var timeout int
	invoke := &cobra.Command{Use: "invoke", Short: "Invoke a direct method on a connected device or module", RunE: func(cmd *cobra.Command, _ []string) error {
		if !json.Valid([]byte(payload)) {
			return fmt.Errorf("--payload is not valid JSON")
		}
		c, err := hubClient(cmd)
		if err != nil {
			return err
		}
		var res hub.MethodResult
		req := hub.MethodRequest{MethodName: name, Payload: json.RawMessage(payload), ResponseTimeoutInSeconds: timeout}
		if err := c.Do(cmd.Context(), "POST", identityPath("/twins/", id, module)+"/methods", "", req, &res); err != nil {
			return err
		}
		return render(cmd, res, [][2]string{{"Status", strconv.Itoa(res.Status)}, {"Payload", string(res.Payload)}})
	}}
	invoke.Flags().StringVar(&id, "device-id", "", "the device's ID")
	invoke.Flags().StringVar(&module, "module-id", "", "a module of the device")
	invoke.Flags().StringVar(&name, "method-name", "", "the method")
	invoke.Flags().StringVar(&payload, "payload", "{}", "the method's payload, as JSON")
	invoke.Flags().IntVar(&timeout, "timeout", 30, "seconds to wait for the answer (5 to 300)")
	_ = invoke.MarkFlagRequired("device-id")
	_ = invoke.MarkFlagRequired("method-name")
	cmd.AddCommand(invoke)
	return cmd
}

// readManifest reads a deployment manifest file: {"content": {"modulesContent": …}}
// as `az` writes it, or just {"modulesContent": …}.
func readManifest(path string) (*hub.ConfigContent, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var wrapped struct {
		Content *hub.ConfigContent `json:"content"`
		hub.ConfigContent
	}
	if err := json.Unmarshal(data, &wrapped); err != nil {
		return nil, fmt.Errorf("%s is not a deployment manifest (%v): it holds {\"modulesContent\": {\"$edgeAgent\": …}}", path, err)
	}
	if wrapped.Content != nil {
		return wrapped.Content, nil
	}
	if len(wrapped.ModulesContent) == 0 {
		return nil, fmt.Errorf("%s has no modulesContent: a manifest sets at least $edgeAgent and $edgeHub", path)
	}
	return &wrapped.ConfigContent, nil
}

func deploymentCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "deployment", Short: "Deploy modules to edge devices at scale (as `az iot edge deployment`)"}
	var id, content, target string
	var priority int
	var layered bool
	idFlag := func(c *cobra.Command) {
		c.Flags().StringVar(&id, "deployment-id", "", "the deployment's ID")
		_ = c.MarkFlagRequired("deployment-id")
	}
	showOne := func(cmd *cobra.Command, c *hub.Configuration) error {
		m := c.SystemMetrics.Results
		return render(cmd, c, [][2]string{
			{"Deployment ID", c.ID}, {"Target condition", c.TargetCondition}, {"Priority", strconv.Itoa(c.Priority)},
			{"Targeted", strconv.FormatInt(m["targetedCount"], 10)}, {"Applied", strconv.FormatInt(m["appliedCount"], 10)},
			{"Reported successful", strconv.FormatInt(m["reportedSuccessfulCount"], 10)},
			{"Reported failed", strconv.FormatInt(m["reportedFailedCount"], 10)},
		})
	}
	create := &cobra.Command{Use: "create", Short: "Create a deployment", RunE: func(cmd *cobra.Command, _ []string) error {
		mc, err := readManifest(content)
		if err != nil {
			return err
		}
		if layered {
			for mod, entries := range mc.ModulesContent {
				if _, ok := entries["properties.desired"]; ok {
					return fmt.Errorf("--layered: module %s sets the whole properties.desired; a layered deployment sets paths such as \"properties.desired.modules.mymodule\"", mod)
				}
			}
		}
		out, err := call[hub.Configuration](cmd, hubClient, "PUT", "/configurations/"+url.PathEscape(id), "",
			hub.Configuration{ID: id, Content: *mc, TargetCondition: target, Priority: priority})
		if err != nil {
			return err
		}
		return showOne(cmd, out)
	}}
	idFlag(create)
	create.Flags().StringVar(&content, "content", "", "the deployment manifest (JSON file)")
	create.Flags().StringVar(&target, "target-condition", "", `which edge devices it targets, e.g. "tags.environment='prod'"`)
	create.Flags().IntVar(&priority, "priority", 0, "higher wins when deployments overlap")
	create.Flags().BoolVar(&layered, "layered", false, "a layered deployment, added on top of the base one")
	_ = create.MarkFlagRequired("content")
	_ = create.MarkFlagRequired("target-condition")
	deployment := resource{svc: hubClient, path: func() string { return "/configurations/" + url.PathEscape(id) }, flags: idFlag, ifMatch: "*"}
	show := showCmd(deployment, "Show a deployment and its metrics", showOne)
	del := deployment.deleteCmd("Delete a deployment")
	list := &cobra.Command{Use: "list", Short: "List deployments with their metrics", RunE: func(cmd *cobra.Command, _ []string) error {
		cs, err := call[[]hub.Configuration](cmd, hubClient, "GET", "/configurations", "", nil)
		if err != nil {
			return err
		}
		rows := make([][]string, 0, len(*cs))
		for _, c := range *cs {
			m := c.SystemMetrics.Results
			rows = append(rows, []string{c.ID, strconv.Itoa(c.Priority), c.TargetCondition,
				strconv.FormatInt(m["targetedCount"], 10), strconv.FormatInt(m["appliedCount"], 10),
				strconv.FormatInt(m["reportedSuccessfulCount"], 10), strconv.FormatInt(m["reportedFailedCount"], 10)})
		}
		return renderTable(cmd, cs, []string{"DEPLOYMENT", "PRIORITY", "TARGET", "TARGETED", "APPLIED", "SUCCESSFUL", "FAILED"}, rows)
	}}
	cmd.AddCommand(create, show, del, list)
	return cmd
}

func edgeCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "edge", Short: "Manage IoT Edge devices (as `az iot edge`)"}
	var id, content string
	set := &cobra.Command{Use: "set-modules", Short: "Apply a deployment manifest to one edge device", RunE: func(cmd *cobra.Command, _ []string) error {
		mc, err := readManifest(content)
		if err != nil {
			return err
		}
		return send(cmd, hubClient, "POST", "/devices/"+url.PathEscape(id)+"/applyConfigurationContent", "", mc)
	}}
	set.Flags().StringVar(&id, "device-id", "", "the edge device")
	set.Flags().StringVar(&content, "content", "", "the deployment manifest (JSON file)")
	_ = set.MarkFlagRequired("device-id")
	_ = set.MarkFlagRequired("content")
	cmd.AddCommand(set)
	return cmd
}

func eventsCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "events", Short: "Read the device-to-cloud event stream"}
	var device string
	var follow bool
	tail := &cobra.Command{Use: "tail", Short: "Print events as JSON lines, oldest first", RunE: func(cmd *cobra.Command, _ []string) error {
		c, err := hubClient(cmd)
		if err != nil {
			return err
		}
		q := url.Values{}
		if device != "" {
			q.Set("device", device)
		}
		if follow {
			q.Set("follow", "true")
		}
		body, err := c.Stream(cmd.Context(), "/events?"+q.Encode())
		if err != nil {
			return err
		}
		defer body.Close()
		sc := bufio.NewScanner(body)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			fmt.Println(sc.Text())
		}
		return sc.Err()
	}}
	tail.Flags().StringVar(&device, "device-id", "", "only this device's events")
	// --device, as it was first spelt; --device-id as everywhere else.
	tail.Flags().StringVar(&device, "device", "", "only this device's events")
	_ = tail.Flags().MarkHidden("device")
	tail.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new events")
	cmd.AddCommand(tail)
	return cmd
}

func c2dCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "c2d", Short: "Send cloud-to-device messages, or purge a device's queue"}
	var id, data, props string
	var ttl time.Duration
	send := &cobra.Command{Use: "send", Short: "Queue a message for a device", RunE: func(cmd *cobra.Command, _ []string) error {
		headers := map[string]string{}
		if cmd.Flags().Changed("ttl") {
			headers["iothub-expiry"] = time.Now().Add(ttl).UTC().Format(time.RFC3339)
		}
		if props != "" {
			for _, kv := range strings.Split(props, ";") {
				k, v, ok := strings.Cut(kv, "=")
				if !ok {
					return fmt.Errorf("--props %q: write key=value pairs separated by ';'", props)
				}
				headers["iothub-app-"+k] = v
			}
		}
		c, err := hubClient(cmd)
		if err != nil {
			return err
		}
		// JSON goes as JSON; anything else as the text it is, as az sends it.
		var body any = json.RawMessage(data)
		if !json.Valid([]byte(data)) {
			body, headers["Content-Type"] = []byte(data), "text/plain; charset=utf-8"
		}
		var out map[string]string
		if _, err := c.DoHeaders(cmd.Context(), "POST", "/devices/"+url.PathEscape(id)+"/messages/deviceBound", "", headers, body, &out); err != nil {
			return err
		}
		return render(cmd, out, [][2]string{{"Message ID", out["messageId"]}})
	}}
	send.Flags().StringVar(&data, "data", "{}", "the message body: JSON, or text")
	send.Flags().StringVar(&props, "props", "", "application properties, key=value;key2=value2")
	send.Flags().DurationVar(&ttl, "ttl", time.Hour, "how long the message waits for the device before it expires (at most 48h)")
	purge := &cobra.Command{Use: "purge", Short: "Remove every message waiting for a device", RunE: func(cmd *cobra.Command, _ []string) error {
		c, err := hubClient(cmd)
		if err != nil {
			return err
		}
		var out struct {
			TotalMessagesPurged int `json:"totalMessagesPurged"`
		}
		if err := c.Do(cmd.Context(), "DELETE", "/devices/"+url.PathEscape(id)+"/commands", "", nil, &out); err != nil {
			return err
		}
		return render(cmd, out, [][2]string{{"Messages purged", strconv.Itoa(out.TotalMessagesPurged)}})
	}}
	for _, c := range []*cobra.Command{send, purge} {
		c.Flags().StringVar(&id, "device-id", "", "the device")
		_ = c.MarkFlagRequired("device-id")
		cmd.AddCommand(c)
	}
	return cmd
}

func certificateCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "certificate", Short: "Manage the CA certificates X.509 devices chain to"}
	var name, path string
	var verified bool
	nameFlag := func(c *cobra.Command) {
		c.Flags().StringVar(&name, "name", "", "the certificate's name")
		_ = c.MarkFlagRequired("name")
	}
	show := func(cmd *cobra.Command, c *hub.Certificate) error {
		return render(cmd, c, [][2]string{{"Name", c.Name}, {"Subject", c.Properties.Subject},
			{"Thumbprint", c.Properties.Thumbprint}, {"Verified", strconv.FormatBool(c.Properties.IsVerified)},
			{"Expires", c.Properties.Expiry.Format("2006-01-02")}})
	}
	create := &cobra.Command{Use: "create", Short: "Upload a CA certificate", RunE: func(cmd *cobra.Command, _ []string) error {
		pem, err := readCertificateFile(path)
		if err != nil {
			return err
		}
		in := hub.Certificate{Properties: hub.CertificateProperties{Certificate: pem, IsVerified: verified}}
		out, err := call[hub.Certificate](cmd, hubClient, "PUT", "/certificates/"+url.PathEscape(name), "", in)
		if err != nil {
			return err
		}
		return show(cmd, out)
	}}
	nameFlag(create)
	create.Flags().StringVar(&path, "path", "", "the CA certificate (PEM)")
	// The enrollment commands name their certificate files so.
	create.Flags().StringVar(&path, "certificate-path", "", "the same as --path")
	create.Flags().BoolVar(&verified, "verified", false, "trust it for device authentication (you vouch that you hold its key)")
	create.MarkFlagsOneRequired("path", "certificate-path")
	create.MarkFlagsMutuallyExclusive("path", "certificate-path")
	certificate := resource{svc: hubClient, path: func() string { return "/certificates/" + url.PathEscape(name) }, flags: nameFlag}
	get := showCmd(certificate, "Show a CA certificate", show)
	del := certificate.deleteCmd("Delete a CA certificate")
	list := &cobra.Command{Use: "list", Short: "List the CA certificates", RunE: func(cmd *cobra.Command, _ []string) error {
		out, err := call[struct {
			Value []hub.Certificate `json:"value"`
		}](cmd, hubClient, "GET", "/certificates", "", nil)
		if err != nil {
			return err
		}
		rows := make([][]string, 0, len(out.Value))
		for _, c := range out.Value {
			p := c.Properties
			rows = append(rows, []string{c.Name, p.Subject, p.Thumbprint, strconv.FormatBool(p.IsVerified), p.Expiry.Format("2006-01-02")})
		}
		return renderTable(cmd, out.Value, []string{"NAME", "SUBJECT", "THUMBPRINT", "VERIFIED", "EXPIRES"}, rows)
	}}
	cmd.AddCommand(create, get, del, list)
	return cmd
}
