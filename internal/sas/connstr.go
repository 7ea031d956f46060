package sas

import (
	"encoding/base64"
	"fmt"
	"strings"
)

// ConnectionString is an Azure IoT connection string:
// HostName=...;SharedAccessKeyName=...;SharedAccessKey=... for a service
// policy, or HostName=...;DeviceId=...;SharedAccessKey=... for a device.
type ConnectionString struct {
	HostName string
	KeyName  string
	DeviceID string
	ModuleID string
	Key      []byte
}

// KeyRule says what ValidKey accepts, for error messages.
const KeyRule = "a base64 key of 16 to 64 bytes"

// ValidKey reports whether k is a shared access key of a size Azure
// accepts.
func ValidKey(k string) bool {
	b, err := base64.StdEncoding.DecodeString(k)
	return err == nil && validKeySize(len(b))
}

func validKeySize(n int) bool { return n >= 16 && n <= 64 }

// ParseConnectionString parses and checks a connection string.
func ParseConnectionString(s string) (*ConnectionString, error) {
	cs := &ConnectionString{}
	for i, part := range strings.Split(strings.TrimSpace(s), ";") {
		if part == "" {
			continue
		}
		k, v, ok := strings.Cut(part, "=")
		if !ok { // not quoted: it may be a key pasted without its name
			return nil, fmt.Errorf("connection string part %d is not Key=Value", i+1)
		}
		switch strings.ToLower(k) {
		case "hostname":
			cs.HostName = v
		case "sharedaccesskeyname":
			cs.KeyName = v
		case "deviceid":
			cs.DeviceID = v
		case "moduleid":
			cs.ModuleID = v
		case "sharedaccesskey":
			key, err := base64.StdEncoding.DecodeString(v)
			if err != nil || !validKeySize(len(key)) {
				return nil, fmt.Errorf("connection string SharedAccessKey must be %s", KeyRule)
			}
			cs.Key = key
		}
	}
	if cs.HostName == "" {
		return nil, fmt.Errorf("connection string has no HostName")
	}
	if len(cs.Key) == 0 {
		return nil, fmt.Errorf("connection string has no SharedAccessKey")
	}
	if cs.KeyName == "" && cs.DeviceID == "" {
		return nil, fmt.Errorf("connection string names neither a SharedAccessKeyName nor a DeviceId")
	}
	return cs, nil
}

// PolicyConnectionString is the connection string of a shared access
// policy of the service at host, whose key is keyB64 (base64, as policies
// keep it).
func PolicyConnectionString(host, keyName, keyB64 string) string {
	return "HostName=" + host + ";SharedAccessKeyName=" + keyName + ";SharedAccessKey=" + keyB64
}

// String renders the connection string in the usual field order.
func (c *ConnectionString) String() string {
	var b strings.Builder
	b.WriteString("HostName=" + c.HostName)
	if c.DeviceID != "" {
		b.WriteString(";DeviceId=" + c.DeviceID)
	}
	if c.ModuleID != "" {
		b.WriteString(";ModuleId=" + c.ModuleID)
	}
	if c.KeyName != "" {
		b.WriteString(";SharedAccessKeyName=" + c.KeyName)
	}
	b.WriteString(";SharedAccessKey=" + base64.StdEncoding.EncodeToString(c.Key))
	return b.String()
}
