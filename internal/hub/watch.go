package hub

import "sync"

// watchers keeps callbacks per key (a device's connection listening for
// desired patches or queued messages); each is removed by its own cancel.
type watchers[K comparable, F any] struct {
	mu sync.Mutex
	m  map[K][]*F
}

func (w *watchers[K, F]) add(k K, f F) (cancel func()) {
	p := &f
	w.mu.Lock()
	if w.m == nil {
		w.m = map[K][]*F{}
	}
	w.m[k] = append(w.m[k], p)
	w.mu.Unlock()
	return func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		fs := w.m[k]
		for i, x := range fs {
			if x == p {
				fs = append(fs[:i:i], fs[i+1:]...)
				break
			}
		}
		if len(fs) == 0 {
			delete(w.m, k)
		} else {
			w.m[k] = fs
		}
	}
}

func (w *watchers[K, F]) get(k K) []*F {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.m[k]
}

func (w *watchers[K, F]) all() []*F {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []*F
	for _, fs := range w.m {
		out = append(out, fs...)
	}
	return out
}
