package query

import (
	"fmt"
	"testing"

	"github.com/hatchery/hatchery/internal/twindoc"
)

// benchTwin is a device twin of typical size, with metadata.
const benchTwin = `{
 "deviceId": "plant7-line3-sensor-0042", "etag": "AAAAAAAAAAc=", "deviceEtag": "NzQ5NDcxNjA5",
 "status": "enabled", "statusUpdateTime": "0001-01-01T00:00:00Z", "connectionState": "Connected",
 "lastActivityTime": "2024-05-01T10:22:31.1234567Z", "cloudToDeviceMessageCount": 0,
 "authenticationType": "sas", "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
 "modelId": "", "version": 42,
 "tags": {"environment": "prod", "site": {"name": "Redmond43", "floor": 3, "line": "3"}, "owner": "ops", "deploymentGroup": "canary"},
 "properties": {
  "desired": {"telemetryConfig": {"sendFrequencyInSecs": 300, "configId": "db00ebf5-eeeb-42be-86a1-458cccb69e57"},
   "$metadata": {"$lastUpdated": "2024-04-30T09:00:00Z", "telemetryConfig": {"$lastUpdated": "2024-04-30T09:00:00Z"}},
   "$version": 4},
  "reported": {"os": "linux", "firmware": "1.2.0", "connectivity": {"type": "cellular", "rssi": -71},
   "telemetryConfig": {"sendFrequencyInSecs": 300, "status": "Success"},
   "$metadata": {"$lastUpdated": "2024-05-01T10:22:31Z"}, "$version": 7}},
 "capabilities": {"iotEdge": false}
}`

func BenchmarkMatch(b *testing.B) {
	var twin map[string]any
	if err := twindoc.Unmarshal([]byte(benchTwin), &twin); err != nil {
		b.Fatal(err)
	}
	for _, bc := range []struct{ name, cond string }{
		{"two-clauses", "tags.environment = 'prod' AND properties.reported.os = 'linux'"},
		{"numeric", "tags.environment = 'prod' AND tags.site.floor >= 2"},
		{"missing", "tags.region = 'eu' OR properties.reported.nothing.here = 1"},
		{"in-list", "tags.deploymentGroup IN ['canary', 'ring1', 'ring2', 'ring3', 'ring4', 'ring5', 'ring6', 'ring7', 'ring8']"},
		{"functions", "STARTSWITH(deviceId, 'plant7-') AND IS_DEFINED(properties.reported.firmware) AND LOWER(status) = 'enabled'"},
	} {
		c, err := ParseCondition(bc.cond)
		if err != nil {
			b.Fatal(err)
		}
		c.Match(twin)
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				c.Match(twin)
			}
		})
	}
}

func BenchmarkParse(b *testing.B) {
	const q = "SELECT deviceId, tags.environment AS env FROM devices WHERE tags.environment = 'prod' AND (properties.reported.os = 'linux' OR STARTSWITH(deviceId, 'edge')) AND tags.site.floor IN [1, 2, 3]"
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Parse(q); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRunGroupBy(b *testing.B) {
	docs := make([]map[string]any, 10000)
	for i := range docs {
		var d map[string]any
		if err := twindoc.Unmarshal([]byte(benchTwin), &d); err != nil {
			b.Fatal(err)
		}
		d["deviceId"] = fmt.Sprint("device-", i)
		d["properties"].(map[string]any)["reported"].(map[string]any)["telemetryConfig"].(map[string]any)["status"] = []string{"Success", "Pending", "Error"}[i%3]
		docs[i] = d
	}
	q, err := Parse("SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS numberOfDevices FROM devices WHERE tags.environment = 'prod' GROUP BY properties.reported.telemetryConfig.status")
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		rows, _ := q.Run(docs)
		if len(rows) != 3 {
			b.Fatal(rows)
		}
	}
}
