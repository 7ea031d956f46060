package main

import (
	"bytes"
	"cmp"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"unicode"

	"github.com/spf13/cobra"

	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/progress"
)

// importRow is one enrollment of an import file, or why it is unusable.
type importRow struct {
	at  string // where in the file: "line 5" (CSV) or "element 3" (JSON)
	e   *dps.Enrollment
	err error
}

func importCmd() *cobra.Command {
	var file, mode string
	var batch int
	var skipInvalid bool
	c := &cobra.Command{
		Use:   "import",
		Short: "Create or update many individual enrollments from a CSV or JSON file",
		Long: `Reads enrollments from --file and sends them with the bulk API, --batch at a time.

A JSON file is an array of enrollments in the service API's shape (as
` + "`hatchery enrollment show -o json`" + ` prints them). A CSV file has a header row naming
its columns, in any order:

  registrationId (required), deviceId, attestation (tpm, symmetricKey or x509),
  endorsementKey, storageRootKey, primaryKey, secondaryKey, certificate (a PEM file),
  iotEdge (true/false), tags and desired (JSON objects: the initial twin),
  provisioningStatus, allocationPolicy, iotHubHostName, iotHubs (host names
  separated by semicolons or spaces), webhookUrl and webhookApiVersion
  (custom allocation; the version 2021-10-01 by default),
  reprovisionPolicy (reprovisionandmigratedata, reprovisionandresetdata or never)

A file with rows that cannot be read or repeat an earlier row's registration ID
imports nothing: those rows are listed with their line (CSV) or element (JSON)
and the reason (--skip-invalid imports the others). Rows the service refuses
(one that exists already, with --mode create) are listed the same way; the
others are imported. -o json prints that report as JSON. An import cut short
(Ctrl-C, the server gone) says from which row to finish.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rows, err := readImport(file)
			if err != nil {
				return err
			}
			return runImport(cmd, rows, mode, batch, skipInvalid)
		},
	}
	c.Flags().StringVar(&file, "file", "", "the CSV or JSON file")
	c.Flags().StringVar(&mode, "mode", "create", "create (refuse existing ones) or update (create or replace)")
	c.Flags().IntVar(&batch, "batch", 1000, "enrollments per bulk request (at most 10000)")
	c.Flags().BoolVar(&skipInvalid, "skip-invalid", false, "import the rows that can be read even when others cannot (by default such a file imports nothing)")
	_ = c.MarkFlagRequired("file")
	return c
}

func readImport(path string) ([]importRow, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	data = bytes.TrimPrefix(data, []byte("\ufeff")) // the byte order mark spreadsheets write
	if trimmed := bytes.TrimSpace(data); strings.EqualFold(filepath.Ext(path), ".json") || bytes.HasPrefix(trimmed, []byte("[")) || bytes.HasPrefix(trimmed, []byte("{")) {
		return readImportJSON(data)
	}
	return readImportCSV(data, filepath.Dir(path))
}

func readImportJSON(data []byte) ([]importRow, error) {
	if bytes.HasPrefix(bytes.TrimSpace(data), []byte("{")) {
		return nil, errors.New("the JSON file holds one object, not an array of enrollments: put the enrollments between [ and ]")
	}
	var raw []json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		if se, ok := errors.AsType[*json.SyntaxError](err); ok {
			line, col := lineColumn(data, se.Offset)
			return nil, fmt.Errorf("the JSON file is not valid JSON at line %d, column %d: %v", line, col, err)
		}
		return nil, fmt.Errorf("the JSON file is not an array of enrollments: %w", err)
	}
	rows := make([]importRow, len(raw))
	for i, r := range raw {
		e := &dps.Enrollment{}
		rows[i] = importRow{at: fmt.Sprintf("element %d", i+1), e: e}
		dec := json.NewDecoder(bytes.NewReader(r))
		dec.DisallowUnknownFields() // a misspelt field would be left out unseen
		err := dec.Decode(e)
		if te, ok := errors.AsType[*json.UnmarshalTypeError](err); ok && te.Field != "" {
			err = fmt.Errorf("%s is a JSON %s where the field takes a %s", te.Field, te.Value, jsonKind(te.Type.Kind()))
		}
		if err != nil {
			rows[i].err = fmt.Errorf("not an enrollment: %v", err)
		}
	}
	return rows, nil
}

// lineColumn is where the byte before offset (the one a JSON syntax error
// was found at) lies in data, counting from 1.
func lineColumn(data []byte, offset int64) (line, col int) {
	if len(data) == 0 {
		return 1, 1
	}
	before := data[:min(max(offset, 1), int64(len(data)))]
	line = bytes.Count(before[:len(before)-1], []byte("\n")) + 1
	return line, len(before) - 1 - bytes.LastIndexByte(before[:len(before)-1], '\n')
}

// jsonKind names what JSON value a Go kind decodes from.
func jsonKind(k reflect.Kind) string {
	switch k {
	case reflect.Bool:
		return "boolean (true or false)"
	case reflect.String:
		return "string"
	case reflect.Slice, reflect.Array:
		return "array"
	case reflect.Map, reflect.Struct, reflect.Pointer:
		return "object"
	}
	return "number"
}

var csvColumns = []string{"registrationid", "deviceid", "attestation", "endorsementkey", "storagerootkey", "primarykey",
	"secondarykey", "certificate", "iotedge", "tags", "desired", "provisioningstatus", "allocationpolicy", "iothubhostname",
	"iothubs", "webhookurl", "webhookapiversion", "reprovisionpolicy"}

func readImportCSV(data []byte, dir string) ([]importRow, error) {
	r := csv.NewReader(bytes.NewReader(data))
	r.FieldsPerRecord = -1
	header, err := r.Read()
	if err != nil {
		return nil, fmt.Errorf("the CSV file has no header row: %w", err)
	}
	col := map[string]int{}
	for i, h := range header {
		name := strings.ToLower(strings.TrimSpace(h))
		known := false
		for _, c := range csvColumns {
			known = known || c == name
		}
		if !known {
			if len(header) == 1 && strings.ContainsAny(h, ";\t") {
				return nil, fmt.Errorf("the CSV header %q has one column: separate columns with commas, not semicolons or tabs", h)
			}
			return nil, fmt.Errorf("CSV column %q is not known: use %s", h, strings.Join(csvColumns, ", "))
		}
		if first, dup := col[name]; dup {
			return nil, fmt.Errorf("CSV column %q appears twice (columns %d and %d): keep one", h, first+1, i+1)
		}
		col[name] = i
	}
	if _, ok := col["registrationid"]; !ok {
		return nil, errors.New("the CSV file has no registrationId column")
	}
	var rows []importRow
	for {
		rec, err := r.Read()
		if errors.Is(err, io.EOF) {
			return rows, nil
		}
		if err != nil {
			line := 0
			if pe, ok := errors.AsType[*csv.ParseError](err); ok {
				line = pe.StartLine
				if errors.Is(err, csv.ErrQuote) && pe.Line > pe.StartLine {
					// The quote swallowed the lines after it.
					err = fmt.Errorf("a quoted field opened on this line is still open at line %d, so the lines between are no rows of their own: close the quote (a quote inside a quoted field is written twice)", pe.Line)
				}
			}
			rows = append(rows, importRow{at: fmt.Sprintf("line %d", line), err: err})
			continue
		}
		line, _ := r.FieldPos(0)
		at := fmt.Sprintf("line %d", line)
		if len(rec) != len(header) {
			fields := fmt.Sprintf("%d fields", len(rec))
			if len(rec) == 1 {
				fields = "1 field"
			}
			rows = append(rows, importRow{at: at, err: fmt.Errorf("has %s where the header names %d columns", fields, len(header))})
			continue
		}
		get := func(name string) string {
			if i, ok := col[name]; ok && i < len(rec) {
				return strings.TrimSpace(rec[i])
			}
			return ""
		}
		e, err := csvEnrollment(get, dir)
		rows = append(rows, importRow{at: at, e: e, err: err})
	}
}

// csvEnrollment builds an enrollment from a CSV row's fields.
func csvEnrollment(get func(string) string, dir string) (*dps.Enrollment, error) {
	e := &dps.Enrollment{RegistrationID: get("registrationid"), DeviceID: get("deviceid"),
		ProvisioningStatus: get("provisioningstatus"), IoTHubHostName: get("iothubhostname"), AllocationPolicy: get("allocationpolicy")}
	switch strings.ToLower(get("attestation")) {
	case "tpm":
		e.Attestation = dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EndorsementKey: get("endorsementkey"), StorageRootKey: get("storagerootkey")}}
	case "symmetrickey", "":
		e.Attestation = dps.Attestation{Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKeyAttestation{PrimaryKey: get("primarykey"), SecondaryKey: get("secondarykey")}}
	case "x509":
		cert := get("certificate")
		if !strings.HasPrefix(cert, "-----") && cert != "" {
			path := cert
			if !filepath.IsAbs(path) {
				path = filepath.Join(dir, path)
			}
			pem, err := readCertificateFile(path)
			if err != nil {
				return nil, fmt.Errorf("certificate: %w", err)
			}
			cert = pem
		}
		e.Attestation = dps.Attestation{Type: dps.AttestationX509, X509: &dps.X509Attestation{
			ClientCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: cert}}}}
	default:
		return nil, fmt.Errorf("attestation %q: use tpm, symmetricKey or x509", get("attestation"))
	}
	if v := get("iotedge"); v != "" {
		edge, err := strconv.ParseBool(v)
		if err != nil {
			return nil, fmt.Errorf("iotEdge %q: use true or false", v)
		}
		e.Capabilities = &dps.Capabilities{IoTEdge: edge}
	}
	tags, err := jsonObject(get, "tags", `{"environment":"prod"}`)
	if err != nil {
		return nil, err
	}
	desired, err := jsonObject(get, "desired", `{"telemetryInterval":10}`)
	if err != nil {
		return nil, err
	}
	if tags != nil || desired != nil {
		e.InitialTwin = &dps.InitialTwin{Tags: tags}
		if desired != nil {
			e.InitialTwin.Properties = &dps.InitialTwinDesired{Desired: desired}
		}
	}
	if v := get("iothubs"); v != "" {
		e.IoTHubs = strings.FieldsFunc(v, func(r rune) bool { return r == ';' || unicode.IsSpace(r) })
	}
	if v := get("webhookurl"); v != "" {
		e.CustomAllocationDefinition = &dps.CustomAllocationDefinition{WebhookURL: v, APIVersion: cmp.Or(get("webhookapiversion"), "2021-10-01")}
	}
	if v := get("reprovisionpolicy"); v != "" {
		p, ok := reprovisionPolicies[strings.ToLower(v)]
		if !ok {
			return nil, fmt.Errorf("reprovisionPolicy %q: use reprovisionandmigratedata, reprovisionandresetdata or never", v)
		}
		e.ReprovisionPolicy = &p
	}
	return e, nil
}

// jsonObject is the CSV field column as a JSON object, nil when empty.
func jsonObject(get func(string) string, column, example string) (json.RawMessage, error) {
	v := get(column)
	if v == "" {
		return nil, nil
	}
	if !json.Valid([]byte(v)) || !strings.HasPrefix(strings.TrimSpace(v), "{") {
		return nil, fmt.Errorf("%s %q is not a JSON object such as %s", column, v, example)
	}
	return json.RawMessage(v), nil
}

// importFailure is a row that was not imported.
type importFailure struct {
	At             string `json:"at"` // "line 5" or "element 3"
	RegistrationID string `json:"registrationId,omitempty"`
	Error          string `json:"error"`
}

func (f importFailure) String() string {
	if f.RegistrationID != "" {
		return fmt.Sprintf("%s (%s): %s", f.At, f.RegistrationID, f.Error)
	}
	return f.At + ": " + f.Error
}

// importReport is what an import did, as -o json prints it.
type importReport struct {
	Imported int             `json:"imported"`
	Total    int             `json:"total"`
	Failures []importFailure `json:"failures"` // in the file's order
	// Stopped is why the import ended early, and where.
	Stopped string `json:"stopped,omitempty"`
}

// runImport sends the readable rows in batches, drawing progress on
// stderr, and reports every row that failed. An interrupt (Ctrl-C) ends it
// with the report of what it did so far.
func runImport(cmd *cobra.Command, rows []importRow, mode string, batch int, skipInvalid bool) error {
	switch mode {
	case dps.BulkCreate, dps.BulkUpdate:
	default:
		return fmt.Errorf("--mode %q: use create or update", mode)
	}
	if batch < 1 || batch > dps.MaxBulk {
		return fmt.Errorf("--batch %d: use 1 to %d", batch, dps.MaxBulk)
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cmd.SetContext(ctx)

	// Failures are listed in the file's order, by row index.
	failures := map[int]importFailure{}
	rowOf := map[string]int{}
	var send []*dps.Enrollment
	for i, r := range rows {
		id := ""
		if r.e != nil {
			id = strings.ToLower(r.e.RegistrationID)
		}
		first, repeated := rowOf[id]
		switch {
		case r.err != nil:
			failures[i] = importFailure{At: r.at, Error: r.err.Error()}
		case id == "":
			failures[i] = importFailure{At: r.at, Error: "no registrationId: every enrollment needs one"}
		case repeated:
			failures[i] = importFailure{At: r.at, RegistrationID: r.e.RegistrationID, Error: "repeats " + rows[first].at}
		default:
			rowOf[id] = i
			send = append(send, r.e)
		}
	}
	rep := importReport{Total: len(rows)}
	if len(failures) > 0 && !skipInvalid {
		reportImport(cmd, rep, failures)
		return fmt.Errorf("nothing was imported: %d of %d rows cannot be imported as they are; fix them, or pass --skip-invalid to import the others", len(failures), len(rows))
	}
	barTo := cmd.ErrOrStderr()
	if jsonOutput(cmd) { // a script's run: the report is all it wants
		barTo = io.Discard
	}
	bar := progress.New(barTo, "importing", len(send))
	for start := 0; start < len(send); start += batch {
		chunk := send[start:min(start+batch, len(send))]
		res, err := call[dps.BulkResult](cmd, dpsClient, "POST", "/enrollments", "", &dps.BulkOperation{Mode: mode, Enrollments: chunk})
		if ctx.Err() != nil {
			err = errors.New("interrupted")
		}
		if err != nil {
			bar.Done()
			at := rows[rowOf[strings.ToLower(chunk[0].RegistrationID)]].at
			rep.Stopped = fmt.Sprintf("stopped after %d enrollments, at %s: %v (those of the rows before it are in, and some of the %d after it may be: "+
				"to finish, import the file again with --mode update)", rep.Imported, at, err, len(chunk))
			reportImport(cmd, rep, failures)
			return errors.New(rep.Stopped)
		}
		rep.Imported += len(chunk) - len(res.Errors)
		for _, f := range res.Errors {
			i := rowOf[strings.ToLower(f.RegistrationID)]
			failures[i] = importFailure{At: rows[i].at, RegistrationID: f.RegistrationID, Error: f.ErrorStatus}
		}
		bar.Add(len(chunk))
	}
	bar.Done()
	if reportImport(cmd, rep, failures) {
		return fmt.Errorf("%d of %d enrollments were not imported", len(failures), len(rows))
	}
	return nil
}

// reportImport prints how many enrollments were imported and the rows that
// failed, in the file's order; it says whether any did.
func reportImport(cmd *cobra.Command, rep importReport, failures map[int]importFailure) bool {
	rep.Failures = make([]importFailure, 0, len(failures))
	for _, i := range slices.Sorted(maps.Keys(failures)) {
		rep.Failures = append(rep.Failures, failures[i])
	}
	if jsonOutput(cmd) {
		_ = printJSON(rep)
		return len(failures) > 0
	}
	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "imported %d of %d enrollments\n", rep.Imported, rep.Total)
	if len(failures) == 0 {
		return false
	}
	fmt.Fprintf(out, "%d failed:\n", len(failures))
	for _, f := range rep.Failures {
		fmt.Fprintln(out, "  "+f.String())
	}
	return true
}
