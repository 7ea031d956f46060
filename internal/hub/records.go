package hub

import (
	"context"
	"log/slog"
	"strings"

	"github.com/hatchery/hatchery/internal/store"
	"github.com/hatchery/hatchery/internal/twindoc"
)

// scan decodes up to limit records of kind with IDs after `after` that
// start with prefix; it returns the ID to continue after ("" at the end).
func (s *Service) scan(ctx context.Context, kind, prefix, after string, limit int) ([]*record, string, error) {
	docs, err := s.store.List(ctx, kind, after, limit)
	if err != nil {
		return nil, "", err
	}
	var out []*record
	for _, d := range docs {
		if !strings.HasPrefix(d.ID, prefix) {
			return out, "", nil
		}
		if rec := decodeListed(d); rec != nil {
			out = append(out, rec)
		}
	}
	next := ""
	if len(docs) == limit {
		next = docs[len(docs)-1].ID
	}
	return out, next, nil
}

// eachRecord calls f with every record of kind, in ID order, until f
// returns an error.
func (s *Service) eachRecord(ctx context.Context, kind string, f func(*record) error) error {
	return s.eachRecordAfter(ctx, kind, "", f)
}

// eachRecordAfter is eachRecord from the first record whose ID is after
// `after`.
func (s *Service) eachRecordAfter(ctx context.Context, kind, after string, f func(*record) error) error {
	return s.eachDocAfter(ctx, kind, after, func(d store.Doc) error {
		if rec := decodeListed(d); rec != nil {
			return f(rec)
		}
		return nil
	})
}

// decodeListed decodes a record met in a list or scan; one that cannot be
// decoded is left out (and logged once), so that it alone fails, not every
// list, query and configuration of the hub.
func decodeListed(d store.Doc) *record {
	rec := &record{}
	if err := twindoc.Unmarshal(d.Body, rec); err != nil {
		if _, seen := corruptLogged.LoadOrStore(d.Kind+"/"+d.ID, true); !seen {
			slog.Error("a stored identity is corrupt: left out of lists and queries (restore it from a backup)", "id", d.ID, "error", err)
		}
		return nil
	}
	return rec
}

// eachDoc calls f with every document of kind, in ID order, a page at a
// time, until f returns an error.
func (s *Service) eachDoc(ctx context.Context, kind string, f func(store.Doc) error) error {
	return s.eachDocAfter(ctx, kind, "", f)
}

// eachDocAfter is eachDoc from the first document whose ID is after `after`.
func (s *Service) eachDocAfter(ctx context.Context, kind, after string, f func(store.Doc) error) error {
	return s.walk(ctx, kind, after, "", docPage, f)
}

// eachDocUnder calls f with every document of kind whose ID starts with
// prefix (a device's modules, its messages), in ID order, page at a time,
// until f returns an error.
func (s *Service) eachDocUnder(ctx context.Context, kind, prefix string, page int, f func(store.Doc) error) error {
	return s.walk(ctx, kind, prefix, prefix, page, f)
}

// walk calls f with the documents of kind after `after` whose IDs start
// with prefix, in ID order, page at a time, until f returns an error.
func (s *Service) walk(ctx context.Context, kind, after, prefix string, page int, f func(store.Doc) error) error {
	for {
		docs, err := s.store.List(ctx, kind, after, page)
		if err != nil {
			return err
		}
		for _, d := range docs {
			if !strings.HasPrefix(d.ID, prefix) {
				return nil
			}
			if err := f(d); err != nil {
				return err
			}
		}
		if len(docs) < page {
			return nil
		}
		after = docs[len(docs)-1].ID
	}
}
