package store

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
)

// A filtered page holds at most its limit of the documents kept, says
// where the next starts, and reads a bounded number of pages: a filter
// that keeps few gives short pages rather than reading everything.
func TestFilteredPage(t *testing.T) {
	ctx := context.Background()
	st, err := OpenSQLite(filepath.Join(t.TempDir(), "page.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for i := range 20 {
		if _, err := st.Create(ctx, Doc{Kind: "k", ID: fmt.Sprintf("d%02d", i), Body: []byte(strconv.Itoa(i))}); err != nil {
			t.Fatal(err)
		}
	}
	page := func(after string, limit, maxPages int, keep func(n int) bool) ([]string, string) {
		var got []string
		next, err := FilteredPage(ctx, st, "k", after, limit, maxPages, func(d Doc) (bool, error) {
			n, _ := strconv.Atoi(string(d.Body))
			if !keep(n) {
				return false, nil
			}
			got = append(got, d.ID)
			return true, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return got, next
	}
	var all []string
	for after, pages := "", 0; pages < 20; pages++ {
		got, next := page(after, 3, 10, func(n int) bool { return n%2 == 0 })
		if len(got) > 3 {
			t.Fatalf("a page of %d, limit 3", len(got))
		}
		all = append(all, got...)
		if after = next; after == "" {
			break
		}
	}
	if want := []string{"d00", "d02", "d04", "d06", "d08", "d10", "d12", "d14", "d16", "d18"}; !slices.Equal(all, want) {
		t.Fatalf("even documents in pages of 3: %v", all)
	}
	// Keeping one in twenty, two pages of two read: short, with where to go on.
	got, next := page("", 2, 2, func(n int) bool { return n == 19 })
	if len(got) != 0 || next != "d03" {
		t.Fatalf("a bounded read: %v, next %q", got, next)
	}
	if got, next = page(next, 2, 100, func(n int) bool { return n == 19 }); !slices.Equal(got, []string{"d19"}) || next != "" {
		t.Fatalf("the rest: %v, next %q", got, next)
	}
}
