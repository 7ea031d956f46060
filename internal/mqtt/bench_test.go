package mqtt

import (
	"bufio"
	"bytes"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Typical Azure IoT telemetry: a property bag in the topic, a small JSON body.
const benchTopic = "devices/dev-000123/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8&alarm=false"

var benchPayload = bytes.Repeat([]byte("x"), 256)

func BenchmarkReadPublish(b *testing.B) {
	enc := mustEncode(&Publish{QoS: 1, PacketID: 7, Topic: benchTopic, Payload: benchPayload})
	const batch = 64
	stream := bytes.Repeat(enc, batch)
	rd := bytes.NewReader(stream)
	br := bufio.NewReaderSize(rd, readBufferSize)
	b.SetBytes(int64(len(enc)))
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if i%batch == 0 {
			rd.Reset(stream)
			br.Reset(rd)
		}
		if _, err := ReadPacket(br, DefaultMaxPacketSize); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEncodePublish(b *testing.B) {
	p := &Publish{QoS: 1, PacketID: 7, Topic: benchTopic, Payload: benchPayload}
	buf := make([]byte, 0, 1024)
	b.ReportAllocs()
	for b.Loop() {
		var err error
		if buf, err = p.Encode(buf[:0]); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkMatchTopic(b *testing.B) {
	for b.Loop() {
		matchTopic("devices/dev-000123/messages/devicebound/#", "devices/dev-000123/messages/devicebound/%24.mid=42&%24.to=%2Fdevices%2Fdev-000123")
	}
}

// benchHandler accepts everyone and drops messages.
type benchHandler struct{ accepted, closed atomic.Int64 }

func (h *benchHandler) Authenticate(*Conn, *Connect) byte        { h.accepted.Add(1); return Accepted }
func (h *benchHandler) Published(*Conn, *Publish) error          { return nil }
func (h *benchHandler) Subscribe(_ *Conn, _ string, q byte) byte { return q }
func (h *benchHandler) Unsubscribe(*Conn, string)                {}
func (h *benchHandler) Closed(*Conn, error)                      { h.closed.Add(1) }

// BenchmarkServerPublishQoS1 measures device-to-cloud QoS 1 messages per
// second through real loopback connections: the client keeps `window`
// messages awaiting PUBACK on each of `conns` connections. Client and server
// share the process, so both msgs/s and cpu-µs/msg count the client too.
func BenchmarkServerPublishQoS1(b *testing.B) {
	for _, useTLS := range []bool{false, true} {
		for _, shape := range []struct{ conns, window int }{{1, 1}, {1, 64}, {100, 8}} {
			name := fmt.Sprintf("tcp/conns=%d/window=%d", shape.conns, shape.window)
			if useTLS {
				name = "tls" + name[3:]
			}
			b.Run(name, func(b *testing.B) { benchPublish(b, useTLS, shape.conns, shape.window) })
		}
	}
}

func benchPublish(b *testing.B, useTLS bool, conns, window int) {
	h := &benchHandler{}
	ts := startServer(b, h, useTLS, func(s *Server) { s.Logger = slog.New(slog.DiscardHandler) })
	clients := make([]*client, conns)
	for i := range clients {
		clients[i] = ts.dial(b)
		if ack := clients[i].connect(fmt.Sprintf("dev-%d", i), "k", 1177); ack.ReturnCode != Accepted {
			b.Fatal(ack.ReturnCode)
		}
	}
	pubs := make([][]byte, conns)
	for i := range pubs {
		pubs[i] = mustEncode(&Publish{QoS: 1, PacketID: 1, Topic: benchTopic, Payload: benchPayload})
	}
	b.ReportAllocs()
	b.ResetTimer()
	start, cpuStart := time.Now(), processCPU()
	var wg sync.WaitGroup
	for i, c := range clients {
		count := b.N / conns
		if i < b.N%conns {
			count++
		}
		if count == 0 {
			continue
		}
		wg.Go(func() {
			sem := make(chan struct{}, window)
			done := make(chan error, 1)
			go func() { // reads the PUBACKs
				for range count {
					c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
					p, err := ReadPacket(c.br, 0)
					if err != nil {
						done <- err
						return
					}
					if _, ok := p.(*Puback); !ok {
						done <- fmt.Errorf("got %s", p.Type())
						return
					}
					<-sem
				}
				done <- nil
			}()
			pkt := pubs[i]
			idAt := len(pkt) - len(benchPayload) - 2
			for n := range count {
				sem <- struct{}{}
				id := uint16(n%65535 + 1)
				pkt[idAt], pkt[idAt+1] = byte(id>>8), byte(id)
				if _, err := c.nc.Write(pkt); err != nil {
					b.Error(err)
					return
				}
			}
			if err := <-done; err != nil {
				b.Error(err)
			}
		})
	}
	wg.Wait()
	elapsed, cpu := time.Since(start), processCPU()-cpuStart
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
	// CPU time of client and server together: unlike msgs/s, it does not
	// depend on what else the machine runs.
	if cpu > 0 {
		b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/msg")
	}
}
