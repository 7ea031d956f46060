package daemon

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/edge/identity"
)

// deviceTLS is the hub TLS configuration presenting an X.509 device's
// certificate, read afresh so that a renewed one is used.
func (a *runner) deviceTLS() (*tls.Config, error) {
	cert, err := a.dev().ClientCertificate()
	if err != nil {
		return nil, err
	}
	conf := a.tls.Clone()
	conf.Certificates = []tls.Certificate{*cert}
	return conf, nil
}

// moduleKeys gives an X.509 edge device's modules their own keys: it reads
// (or creates) each module's identity through the hub's device-scope
// registry API, authenticated by the device's certificate, as the hosted
// runtime's identity service does, and keeps the keys in memory only.
type moduleKeys struct {
	dev       func() *identity.Device
	tls       func() (*tls.Config, error)
	httpsPort int

	mu   sync.Mutex
	keys map[string][]byte // by hub/device/module, so a new identity starts afresh
}

func (k *moduleKeys) sign(module string, data []byte) ([]byte, error) {
	key, err := k.key(module)
	if err != nil {
		return nil, err
	}
	mac := hmac.New(sha256.New, key)
	mac.Write(data)
	return mac.Sum(nil), nil
}

func (k *moduleKeys) key(module string) ([]byte, error) {
	dev := k.dev()
	id := dev.HubHostName + "/" + dev.DeviceID + "/" + module
	k.mu.Lock()
	key, ok := k.keys[id]
	k.mu.Unlock()
	if ok {
		return key, nil
	}
	// Fetched without the lock, so one module's slow fetch does not hold
	// up the others' signing; two fetches of one module get the same key.
	conf, err := k.tls()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c := azclient.NewDevice(dev.HubHostName, "https://"+net.JoinHostPort(dev.HubHostName, strconv.Itoa(k.httpsPort)), "2020-09-30", conf, nil)
	path := "/devices/" + url.PathEscape(dev.DeviceID) + "/modules/" + url.PathEscape(module)
	var m struct {
		Authentication struct {
			SymmetricKey struct {
				PrimaryKey string `json:"primaryKey"`
			} `json:"symmetricKey"`
		} `json:"authentication"`
	}
	err = c.Do(ctx, "GET", path, "", nil, &m)
	if azerr.As(err).Status() == 404 {
		err = c.Do(ctx, "PUT", path, "", map[string]string{"moduleId": module, "managedBy": "iotEdge"}, &m)
	}
	if err != nil {
		return nil, fmt.Errorf("reading module %s's identity from the hub: %w", module, err)
	}
	key, err = base64.StdEncoding.DecodeString(m.Authentication.SymmetricKey.PrimaryKey)
	if err != nil || len(key) == 0 {
		return nil, fmt.Errorf("the hub's identity of module %s has no symmetric key", module)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.keys == nil {
		k.keys = map[string][]byte{}
	}
	k.keys[id] = key
	return key, nil
}
