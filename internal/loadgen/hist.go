package loadgen

import (
	"math"
	"math/bits"
	"slices"
	"sync/atomic"
	"time"
)

// histSub is the number of buckets per power of two: values are kept to
// within about 3 %, exactly below 64 µs.
const (
	histSub     = 32
	histBuckets = 40 * histSub // up to 2^39 µs, far beyond any run
)

// Histogram counts latencies in microseconds in log-linear buckets. Record
// is safe for concurrent use; the zero value is ready.
type Histogram struct {
	counts [histBuckets]atomic.Uint64
	max    atomic.Uint64
}

func histIndex(us uint64) int {
	if us < 2*histSub {
		return int(us)
	}
	e := bits.Len64(us) - 6 // us>>e is in [32, 64)
	return min(int(uint64(e+1)*histSub+(us>>e)-histSub), histBuckets-1)
}

// histLow is the smallest value that falls in bucket i.
func histLow(i int) uint64 {
	if i < 2*histSub {
		return uint64(i)
	}
	e := i/histSub - 1
	return uint64(i%histSub+histSub) << e
}

// Record adds one latency.
func (h *Histogram) Record(d time.Duration) {
	us := uint64(max(d.Microseconds(), 0))
	h.counts[histIndex(us)].Add(1)
	for {
		m := h.max.Load()
		if us <= m || h.max.CompareAndSwap(m, us) {
			return
		}
	}
}

// Snapshot is a histogram as it travels between processes: the non-empty
// buckets and the largest value.
type Snapshot struct {
	Buckets map[int]uint64 `json:"buckets"`
	MaxUS   uint64         `json:"maxUs"`
}

// Snapshot copies the counts.
func (h *Histogram) Snapshot() Snapshot {
	s := Snapshot{Buckets: map[int]uint64{}, MaxUS: h.max.Load()}
	for i := range h.counts {
		if n := h.counts[i].Load(); n > 0 {
			s.Buckets[i] = n
		}
	}
	return s
}

// Merge adds another snapshot's counts.
func (s *Snapshot) Merge(o Snapshot) {
	if s.Buckets == nil {
		s.Buckets = map[int]uint64{}
	}
	for i, n := range o.Buckets {
		s.Buckets[i] += n
	}
	s.MaxUS = max(s.MaxUS, o.MaxUS)
}

// Count is the number of values recorded.
func (s Snapshot) Count() uint64 {
	var n uint64
	for _, c := range s.Buckets {
		n += c
	}
	return n
}

// Quantile returns the value below which a fraction q of the values lie
// (the middle of its bucket), in milliseconds.
func (s Snapshot) Quantile(q float64) float64 {
	total := s.Count()
	if total == 0 {
		return 0
	}
	idx := make([]int, 0, len(s.Buckets))
	for i := range s.Buckets {
		idx = append(idx, i)
	}
	slices.Sort(idx)
	rank := uint64(nearestRank(q, int(total)))
	var seen uint64
	for _, i := range idx {
		seen += s.Buckets[i]
		if seen >= rank {
			lo, hi := histLow(i), histLow(i+1)
			mid := float64(lo+hi-1) / 2
			return min(mid, float64(s.MaxUS)) / 1000
		}
	}
	return float64(s.MaxUS) / 1000
}

// nearestRank is the 1-based rank of the q-quantile of n sorted values:
// the smallest value with at least a fraction q of the values at or below it.
func nearestRank(q float64, n int) int {
	return min(max(int(math.Ceil(q*float64(n))), 1), n)
}

// Latency summarizes a distribution in milliseconds.
type Latency struct {
	Count uint64  `json:"count"`
	P50   float64 `json:"p50Ms"`
	P99   float64 `json:"p99Ms"`
	Max   float64 `json:"maxMs"`
}

// Summary is the snapshot's p50, p99 and maximum.
func (s Snapshot) Summary() Latency {
	return Latency{Count: s.Count(), P50: s.Quantile(0.5), P99: s.Quantile(0.99), Max: float64(s.MaxUS) / 1000}
}

// summarize computes exact percentiles of a small sample.
func summarize(ds []time.Duration) Latency {
	if len(ds) == 0 {
		return Latency{}
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	at := func(q float64) float64 {
		return float64(s[nearestRank(q, len(s))-1].Microseconds()) / 1000
	}
	return Latency{Count: uint64(len(s)), P50: at(0.5), P99: at(0.99), Max: float64(s[len(s)-1].Microseconds()) / 1000}
}
