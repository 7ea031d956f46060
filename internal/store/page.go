package store

import "context"

// FilteredPage is a page of up to limit documents of kind after `after`,
// in ID order, of those keep takes (keep decodes and keeps what it
// takes). It reads at most maxPages pages of limit documents, so that a
// filter that takes few costs a request a bounded read: the page may then
// come back short, even empty. next is where the following page starts,
// "" when there is none.
func FilteredPage(ctx context.Context, st Store, kind, after string, limit, maxPages int, keep func(Doc) (bool, error)) (next string, err error) {
	kept := 0
	for range maxPages {
		docs, err := st.List(ctx, kind, after, limit)
		if err != nil {
			return "", err
		}
		for i, d := range docs {
			took, err := keep(d)
			if err != nil {
				return "", err
			}
			if took {
				kept++
			}
			if kept == limit && (i < len(docs)-1 || len(docs) == limit) {
				return d.ID, nil
			}
		}
		if len(docs) < limit {
			return "", nil
		}
		after = docs[len(docs)-1].ID
	}
	return after, nil
}
