// Package hubdevice is the device side of the IoT hub's MQTT endpoint: one
// connection per device or module identity, with telemetry, the twin,
// desired-property patches, direct methods and cloud-to-device messages,
// in the Azure IoT Hub topic layout.
package hubdevice

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/mqtt"
)

// APIVersion is the IoT Hub API version put in the username.
const APIVersion = "2021-04-12"

// ErrNotAuthorized is the hub refusing the credentials (CONNACK 5): the
// identity is unknown, disabled or its key is wrong. Edge devices
// reprovision on it.
var ErrNotAuthorized = errors.New("the hub refused the device's credentials (not authorized)")

// Options say where and as whom to connect.
type Options struct {
	Host string // hub host name
	Port int    // default 8883
	// Addr, when set, is dialed instead of Host:Port (Host still names the hub).
	Addr      string
	DeviceID  string
	ModuleID  string
	TLS       *tls.Config
	KeepAlive time.Duration // default 60 s
	// Sign returns a SAS token for audience, valid until expiry; for a TPM
	// device it signs inside the TPM. Nil for a device that authenticates
	// with the client certificate in TLS.
	Sign          func(audience string, expiry time.Time) (string, error)
	TokenLifetime time.Duration // default 1 h
}

// Client is one connection.
type Client struct {
	opts Options
	conn net.Conn
	rd   *bufio.Reader

	wmu    sync.Mutex
	mu     sync.Mutex
	nextID uint16
	acks   map[uint16]chan error    // QoS 1 publishes and subscribes awaiting their ack
	twin   map[string]chan response // by $rid
	rid    uint64
	subs   map[string]func(*mqtt.Publish)
	done   chan struct{}
	err    error
}

type response struct {
	status int
	query  url.Values
	body   []byte
}

func (o *Options) clientID() string {
	if o.ModuleID != "" {
		return o.DeviceID + "/" + o.ModuleID
	}
	return o.DeviceID
}

// Dial connects and authenticates.
func Dial(ctx context.Context, o Options) (*Client, error) {
	if o.Port == 0 {
		o.Port = 8883
	}
	if o.KeepAlive == 0 {
		o.KeepAlive = 60 * time.Second
	}
	if o.TokenLifetime == 0 {
		o.TokenLifetime = time.Hour
	}
	aud := o.Host + "/devices/" + o.DeviceID
	if o.ModuleID != "" {
		aud += "/modules/" + o.ModuleID
	}
	var token string
	if o.Sign != nil {
		var err error
		if token, err = o.Sign(aud, time.Now().Add(o.TokenLifetime)); err != nil {
			return nil, fmt.Errorf("signing the hub token: %w", err)
		}
	}
	tlsConf := o.TLS.Clone()
	if tlsConf == nil {
		tlsConf = &tls.Config{}
	}
	if tlsConf.ServerName == "" {
		tlsConf.ServerName = o.Host
	}
	d := tls.Dialer{Config: tlsConf, NetDialer: &net.Dialer{Timeout: 15 * time.Second}}
	addr := o.Addr
	if addr == "" {
		addr = net.JoinHostPort(o.Host, strconv.Itoa(o.Port))
	}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("connecting to the hub at %s: %w", addr, err)
	}
	c := &Client{opts: o, conn: conn, rd: bufio.NewReaderSize(conn, 4096), acks: map[uint16]chan error{},
		twin: map[string]chan response{}, subs: map[string]func(*mqtt.Publish){}, done: make(chan struct{})}
	connect := &mqtt.Connect{ProtocolLevel: 4, CleanSession: true, KeepAlive: uint16(o.KeepAlive / time.Second),
		ClientID: o.clientID(), HasUsername: true, Username: o.Host + "/" + o.clientID() + "/?api-version=" + APIVersion,
		HasPassword: token != "", Password: []byte(token)}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	} else {
		_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	}
	if err := c.write(connect); err != nil {
		conn.Close()
		return nil, err
	}
	p, err := mqtt.ReadPacket(c.rd, mqtt.DefaultMaxPacketSize)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("reading the hub's CONNACK: %w", err)
	}
	ack, ok := p.(*mqtt.Connack)
	switch {
	case !ok:
		conn.Close()
		return nil, fmt.Errorf("the hub answered CONNECT with %s", p.Type())
	case ack.ReturnCode == mqtt.RefusedNotAuthorized || ack.ReturnCode == mqtt.RefusedBadUsernamePassword:
		conn.Close()
		return nil, ErrNotAuthorized
	case ack.ReturnCode != mqtt.Accepted:
		conn.Close()
		return nil, fmt.Errorf("the hub refused the connection with CONNACK code %d", ack.ReturnCode)
	}
	_ = conn.SetDeadline(time.Time{})
	go c.readLoop()
	go c.keepAlive()
	if err := c.subscribe(ctx, "$iothub/twin/res/#", c.onTwinResponse); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Done is closed when the connection ends; Err then says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err is why the connection ended (nil while it is up or after Close).
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close disconnects.
func (c *Client) Close() {
	_ = c.write(&mqtt.Disconnect{})
	c.fail(nil)
}

func (c *Client) fail(err error) {
	c.mu.Lock()
	select {
	case <-c.done:
		c.mu.Unlock()
		return
	default:
	}
	c.err = err
	close(c.done)
	acks := c.acks
	c.acks = map[uint16]chan error{}
	c.mu.Unlock()
	c.conn.Close()
	for _, ch := range acks {
		ch <- errors.New("connection to the hub closed")
	}
}

func (c *Client) write(p mqtt.Packet) error {
	buf, err := p.Encode(nil)
	if err != nil {
		return err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.conn.SetWriteDeadline(time.Now().Add(30 * time.Second))
	_, err = c.conn.Write(buf)
	return err
}

func (c *Client) keepAlive() {
	t := time.NewTicker(c.opts.KeepAlive / 2)
	defer t.Stop()
	for {
		select {
		case <-c.done:
			return
		case <-t.C:
			if err := c.write(&mqtt.Pingreq{}); err != nil {
				c.fail(err)
				return
			}
		}
	}
}

func (c *Client) readLoop() {
	for {
		p, err := mqtt.ReadPacket(c.rd, mqtt.DefaultMaxPacketSize)
		if err != nil {
			c.fail(fmt.Errorf("connection to the hub lost: %w", err))
			return
		}
		switch p := p.(type) {
		case *mqtt.Puback:
			c.ack(p.PacketID, nil)
		case *mqtt.Unsuback:
			c.ack(p.PacketID, nil)
		case *mqtt.Suback:
			var err error
			for _, code := range p.ReturnCodes {
				if code == mqtt.SubscribeFailure {
					err = errors.New("the hub refused the subscription")
				}
			}
			c.ack(p.PacketID, err)
		case *mqtt.Publish:
			c.dispatch(p)
			if p.QoS == 1 {
				_ = c.write(&mqtt.Puback{PacketID: p.PacketID})
			}
		}
	}
}

func (c *Client) ack(id uint16, err error) {
	c.mu.Lock()
	ch := c.acks[id]
	delete(c.acks, id)
	c.mu.Unlock()
	if ch != nil {
		ch <- err
	}
}

func (c *Client) dispatch(p *mqtt.Publish) {
	c.mu.Lock()
	var h func(*mqtt.Publish)
	for prefix, f := range c.subs {
		if strings.HasPrefix(p.Topic, prefix) {
			h = f
			break
		}
	}
	c.mu.Unlock()
	if h != nil {
		h(p)
	}
}

// await sends a packet carrying a fresh packet ID and waits for its ack.
func (c *Client) await(ctx context.Context, build func(id uint16) mqtt.Packet) error {
	ch := make(chan error, 1)
	c.mu.Lock()
	c.nextID++
	if c.nextID == 0 {
		c.nextID = 1
	}
	id := c.nextID
	c.acks[id] = ch
	c.mu.Unlock()
	// Unanswered (timed out, or the write failed), the entry would stay for
	// the life of the connection, and a later request given the same ID
	// once the IDs wrap would find it; answered, ack already removed it.
	defer func() {
		c.mu.Lock()
		if c.acks[id] == ch {
			delete(c.acks, id)
		}
		c.mu.Unlock()
	}()
	if err := c.write(build(id)); err != nil {
		return err
	}
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return ctx.Err()
	case <-c.done:
		return errors.New("connection to the hub closed")
	}
}

func (c *Client) subscribe(ctx context.Context, filter string, h func(*mqtt.Publish)) error {
	c.mu.Lock()
	c.subs[strings.TrimSuffix(filter, "#")] = h
	c.mu.Unlock()
	return c.await(ctx, func(id uint16) mqtt.Packet {
		return &mqtt.Subscribe{PacketID: id, Subscriptions: []mqtt.Subscription{{Filter: filter, QoS: 1}}}
	})
}

// Unsubscribe ends the subscription to filter, as subscribed by OnC2D,
// OnDesired or OnMethod, and waits for the hub's ack.
func (c *Client) Unsubscribe(ctx context.Context, filter string) error {
	c.mu.Lock()
	delete(c.subs, strings.TrimSuffix(filter, "#"))
	c.mu.Unlock()
	return c.await(ctx, func(id uint16) mqtt.Packet {
		return &mqtt.Unsubscribe{PacketID: id, Filters: []string{filter}}
	})
}

func (c *Client) onTwinResponse(p *mqtt.Publish) {
	rest := strings.TrimPrefix(p.Topic, "$iothub/twin/res/")
	statusText, q, _ := strings.Cut(rest, "/?")
	status, _ := strconv.Atoi(statusText)
	query, _ := url.ParseQuery(q)
	c.mu.Lock()
	ch := c.twin[query.Get("$rid")]
	delete(c.twin, query.Get("$rid"))
	c.mu.Unlock()
	if ch != nil {
		ch <- response{status: status, query: query, body: p.Payload}
	}
}

func (c *Client) request(ctx context.Context, topic string, body []byte) (response, error) {
	ch := make(chan response, 1)
	c.mu.Lock()
	c.rid++
	rid := strconv.FormatUint(c.rid, 10)
	c.twin[rid] = ch
	c.mu.Unlock()
	defer func() { // unanswered, as in await
		c.mu.Lock()
		if c.twin[rid] == ch {
			delete(c.twin, rid)
		}
		c.mu.Unlock()
	}()
	if err := c.write(&mqtt.Publish{Topic: topic + "?$rid=" + rid, Payload: body}); err != nil {
		return response{}, err
	}
	select {
	case r := <-ch:
		return r, nil
	case <-ctx.Done():
		return response{}, ctx.Err()
	case <-c.done:
		return response{}, errors.New("connection to the hub closed")
	}
}

// Twin is the device's view of its twin.
type Twin struct {
	Desired  json.RawMessage `json:"desired"`
	Reported json.RawMessage `json:"reported"`
}

// GetTwin reads the twin.
func (c *Client) GetTwin(ctx context.Context) (*Twin, error) {
	r, err := c.request(ctx, "$iothub/twin/GET/", nil)
	if err != nil {
		return nil, err
	}
	if r.status != 200 {
		return nil, fmt.Errorf("the hub answered the twin request with status %d", r.status)
	}
	t := &Twin{}
	return t, json.Unmarshal(r.body, t)
}

// PatchReported merges reported properties and returns the new version.
func (c *Client) PatchReported(ctx context.Context, patch any) (int64, error) {
	body, err := json.Marshal(patch)
	if err != nil {
		return 0, err
	}
	r, err := c.request(ctx, "$iothub/twin/PATCH/properties/reported/", body)
	if err != nil {
		return 0, err
	}
	if r.status/100 != 2 {
		var e struct {
			Message string `json:"message"`
		}
		_ = json.Unmarshal(r.body, &e)
		return 0, fmt.Errorf("the hub refused the reported properties with status %d: %s", r.status, e.Message)
	}
	return strconv.ParseInt(r.query.Get("$version"), 10, 64)
}

// OnDesired subscribes to desired-property patches. f runs on the
// connection's read loop, in order: it must not block, nor wait for an
// answer of the hub (PatchReported, GetTwin), which that loop reads —
// hand such work to a goroutine.
func (c *Client) OnDesired(ctx context.Context, f func(patch []byte)) error {
	return c.subscribe(ctx, "$iothub/twin/PATCH/properties/desired/#", func(p *mqtt.Publish) { f(p.Payload) })
}

// OnMethod subscribes to direct methods; f's answer is sent back.
func (c *Client) OnMethod(ctx context.Context, f func(name string, payload []byte) (int, []byte)) error {
	return c.subscribe(ctx, "$iothub/methods/POST/#", func(p *mqtt.Publish) {
		name, q, _ := strings.Cut(strings.TrimPrefix(p.Topic, "$iothub/methods/POST/"), "/?")
		query, _ := url.ParseQuery(q)
		go func() {
			status, resp := f(name, p.Payload)
			_ = c.write(&mqtt.Publish{Topic: "$iothub/methods/res/" + strconv.Itoa(status) + "/?$rid=" + query.Get("$rid"), Payload: resp})
		}()
	})
}

// OnC2D subscribes to cloud-to-device messages. f runs on the
// connection's read loop, as OnDesired's does, under the same rule.
func (c *Client) OnC2D(ctx context.Context, f func(props url.Values, body []byte)) error {
	prefix := "devices/" + c.opts.DeviceID + "/messages/devicebound/"
	return c.subscribe(ctx, prefix+"#", func(p *mqtt.Publish) {
		props, _ := url.ParseQuery(strings.TrimPrefix(p.Topic, prefix))
		f(props, p.Payload)
	})
}

// SendEvent sends telemetry at QoS 1 and waits for the hub's ack.
func (c *Client) SendEvent(ctx context.Context, body []byte, props url.Values) error {
	topic := "devices/" + c.opts.DeviceID + "/"
	if c.opts.ModuleID != "" {
		topic += "modules/" + c.opts.ModuleID + "/"
	}
	topic += "messages/events/" + props.Encode()
	return c.await(ctx, func(id uint16) mqtt.Packet {
		return &mqtt.Publish{QoS: 1, PacketID: id, Topic: topic, Payload: body}
	})
}

// Publish sends a raw QoS 0 message to topic.
func (c *Client) Publish(topic string, body []byte) error {
	return c.write(&mqtt.Publish{Topic: topic, Payload: body})
}
