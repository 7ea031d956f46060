// Package azclient calls Azure-style service REST APIs (DPS, IoT Hub)
// authenticated with a shared access policy's connection string, or as a
// device (its token or client certificate) for the device-scope APIs.
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
	host       string
	endpoint   string
	apiVersion string
	http       *http.Client
	// token returns the Authorization header for a token valid for at
	// least life; "" sends none (a client certificate authenticates).
	token func(life time.Duration) (string, error)
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
	return newClient(cs.HostName, endpoint, apiVersion, tlsConfig, func(life time.Duration) (string, error) {
		return sas.Build(cs.Key, cs.HostName, cs.KeyName, time.Now().Add(life)), nil
	}), nil
}

// NewDevice makes a client acting as a device: token signs its tokens
// (audience {host}/devices/{id}), or, when nil, the client certificate in
// tlsConfig authenticates it.
func NewDevice(host, endpoint, apiVersion string, tlsConfig *tls.Config, token func(life time.Duration) (string, error)) *Client {
	if token == nil {
		token = func(time.Duration) (string, error) { return "", nil }
	}
	return newClient(host, endpoint, apiVersion, tlsConfig, token)
}

func newClient(host, endpoint, apiVersion string, tlsConfig *tls.Config, token func(time.Duration) (string, error)) *Client {
	if endpoint == "" {
		endpoint = "https://" + host
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = tlsConfig
	tr.MaxIdleConnsPerHost = 64
	return &Client{host: host, endpoint: strings.TrimSuffix(endpoint, "/"), apiVersion: apiVersion, token: token,
		http: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

// authorize sets the Authorization header, if the client uses tokens.
func (c *Client) authorize(req *http.Request, life time.Duration) error {
	tok, err := c.token(life)
	if err != nil {
		return err
	}
	if tok != "" {
		req.Header.Set("Authorization", tok)
	}
	return nil
}

// Do sends one request; a non-2xx answer becomes an *azerr.Error carrying
// the service's message.
func (c *Client) Do(ctx context.Context, method, path, ifMatch string, in, out any) error {
	_, err := c.DoHeaders(ctx, method, path, ifMatch, nil, in, out)
	return err
}

// QueryAll pages through a query endpoint — POST path with {"query":
// query}, 1,000 items a page, following x-ms-continuation — and returns
// every item.
func QueryAll[T any](ctx context.Context, c *Client, path, query string) ([]*T, error) {
	var all []*T
	err := QueryPages(ctx, c, path, query, func(page []*T) bool {
		all = append(all, page...)
		return true
	})
	return all, err
}

// QueryPages sends the query and gives each page of the answer to more,
// following continuation tokens until more returns false or none is left.
func QueryPages[T any](ctx context.Context, c *Client, path, query string, more func([]*T) bool) error {
	cont := ""
	for {
		var page []*T
		h := map[string]string{"x-ms-max-item-count": "1000"}
		if cont != "" {
			h["x-ms-continuation"] = cont
		}
		resp, err := c.DoHeaders(ctx, "POST", path, "", h, map[string]string{"query": query}, &page)
		if err != nil {
			return err
		}
		if !more(page) {
			return nil
		}
		if cont = resp.Get("x-ms-continuation"); cont == "" {
			return nil
		}
	}
}

// DoHeaders is Do with extra request headers, returning the response headers.
func (c *Client) DoHeaders(ctx context.Context, method, path, ifMatch string, headers map[string]string, in, out any) (http.Header, error) {
	var body io.Reader
	switch in := in.(type) {
	case nil:
	case []byte: // sent as it is; headers say its Content-Type
		body = bytes.NewReader(in)
	default:
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
	if err := c.authorize(req, time.Hour); err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	if ifMatch != "" {
		req.Header.Set("If-Match", ifMatch)
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, azerr.New(503001, "Unreachable", "%s is unreachable: %v", c.host, err)
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
	if err := c.authorize(req, 24*time.Hour); err != nil {
		return nil, err
	}
	streaming := &http.Client{Transport: c.http.Transport} // no overall timeout: the stream may stay open
	resp, err := streaming.Do(req)
	if err != nil {
		return nil, azerr.New(503001, "Unreachable", "%s is unreachable: %v", c.host, err)
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return nil, azerr.New(resp.StatusCode*1000, "ServiceError", "GET %s: %s (HTTP %d)", path, strings.TrimSpace(string(data)), resp.StatusCode)
	}
	return resp.Body, nil
}
