// Package azclient calls Azure-style service REST APIs (DPS, IoT Hub)
// authenticated with a shared access policy's connection string.
package azclient

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/sas"
)

// Client calls one service.
type Client struct {
	cs         *sas.ConnectionString
	endpoint   string
	apiVersion string
	http       *http.Client
}

// New makes a client for the service of connString; endpoint overrides
// https://HostName (for a service on another port).
func New(connString, endpoint, apiVersion string, tlsConfig *tls.Config) (*Client, error) {
	cs, err := sas.ParseConnectionString(connString)
	if err != nil {
		return nil, err
	}
	if cs.KeyName == "" {
		return nil, fmt.Errorf("connection string for %s names no SharedAccessKeyName: use a shared access policy's connection string", cs.HostName)
	}
	if endpoint == "" {
		endpoint = "https://" + cs.HostName
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = tlsConfig
	tr.MaxIdleConnsPerHost = 64
	return &Client{cs: cs, endpoint: strings.TrimSuffix(endpoint, "/"), apiVersion: apiVersion,
		http: &http.Client{Transport: tr, Timeout: 30 * time.Second}}, nil
}

// HostName is the service's host name from the connection string.
func (c *Client) HostName() string { return c.cs.HostName }

// Do sends one request; a non-2xx answer becomes an *azerr.Error carrying
// the service's message.
func (c *Client) Do(ctx context.Context, method, path, ifMatch string, in, out any) error {
	_, err := c.DoHeaders(ctx, method, path, ifMatch, nil, in, out)
	return err
}

// DoHeaders is Do with extra request headers, returning the response headers.
func (c *Client) DoHeaders(ctx context.Context, method, path, ifMatch string, headers map[string]string, in, out any) (http.Header, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, err
		}
		body = bytes.NewReader(b)
	}
	sep := "?"
	if strings.Contains(path, "?") {
		sep = "&"
	}
	req, err := http.NewRequestWithContext(ctx, method, c.endpoint+path+sep+"api-version="+c.apiVersion, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", sas.Build(c.cs.Key, c.cs.HostName, c.cs.KeyName, time.Now().Add(time.Hour)))
	req.Header.Set("Content-Type", "application/json")
	if ifMatch != "" {
		req.Header.Set("If-Match", ifMatch)
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, azerr.New(503001, "Unreachable", "%s is unreachable: %v", c.cs.HostName, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if resp.StatusCode >= 300 {
		var e struct {
			Message   string `json:"message"`
			ErrorCode int    `json:"errorCode"`
		}
		_ = json.Unmarshal(data, &e)
		code := e.ErrorCode
		if code/1000 != resp.StatusCode {
			code = resp.StatusCode * 1000
		}
		msg := e.Message
		if msg == "" {
			msg = strings.TrimSpace(string(data))
		}
		return resp.Header, azerr.New(code, "ServiceError", "%s %s: %s (HTTP %d)", method, path, msg, resp.StatusCode)
	}
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			return resp.Header, fmt.Errorf("%s %s: answer is not the expected JSON: %v", method, path, err)
		}
	}
	return resp.Header, nil
}

// Stream sends a GET and returns the open response body, for answers that
// stream (the event stream).
func (c *Client) Stream(ctx context.Context, path string) (io.ReadCloser, error) {
	sep := "?"
	if strings.Contains(path, "?") {
		sep = "&"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.endpoint+path+sep+"api-version="+c.apiVersion, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", sas.Build(c.cs.Key, c.cs.HostName, c.cs.KeyName, time.Now().Add(24*time.Hour)))
	streaming := &http.Client{Transport: c.http.Transport} // no overall timeout: the stream may stay open
	resp, err := streaming.Do(req)
	if err != nil {
		return nil, azerr.New(503001, "Unreachable", "%s is unreachable: %v", c.cs.HostName, err)
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return nil, azerr.New(resp.StatusCode*1000, "ServiceError", "GET %s: %s (HTTP %d)", path, strings.TrimSpace(string(data)), resp.StatusCode)
	}
	return resp.Body, nil
}
