package mqtt

import (
	"errors"
	"strings"
	"unicode/utf8"
)

// ValidateTopicName reports why name cannot be the topic of a PUBLISH, or nil.
func ValidateTopicName(name string) error {
	if len(name) > maxStringLength {
		return errors.New("topic name is longer than 65535 bytes")
	}
	if reason := checkUTF8(name); reason != "" {
		return errors.New(reason)
	}
	if reason := topicNameReason(name); reason != "" {
		return errors.New(reason)
	}
	return nil
}

// validateTopicFilter reports why filter cannot be a SUBSCRIBE topic filter, or nil.
func validateTopicFilter(filter string) error {
	if len(filter) > maxStringLength {
		return errors.New("topic filter is longer than 65535 bytes")
	}
	if reason := checkUTF8(filter); reason != "" {
		return errors.New(reason)
	}
	if reason := topicFilterReason(filter); reason != "" {
		return errors.New(reason)
	}
	return nil
}

// checkUTF8 reports what makes s an invalid MQTT UTF-8 string (section
// 1.5.3): ill-formed UTF-8 (which includes encoded surrogates) or U+0000.
func checkUTF8(s string) string {
	for i := 0; i < len(s); {
		c := s[i]
		if c == 0 {
			return "contains U+0000"
		}
		if c < utf8.RuneSelf {
			i++
			continue
		}
		r, n := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && n <= 1 {
			return "invalid UTF-8"
		}
		i += n
	}
	return ""
}

// topicNameReason checks the wildcard-free, non-empty rule of topic names
// (section 4.7). The string must already be valid UTF-8.
func topicNameReason(name string) string {
	if len(name) == 0 {
		return "must not be empty"
	}
	for i := 0; i < len(name); i++ {
		switch name[i] {
		case '+':
			return "wildcard '+' is not allowed in a topic name"
		case '#':
			return "wildcard '#' is not allowed in a topic name"
		}
	}
	return ""
}

// topicFilterReason checks wildcard placement in a topic filter (section
// 4.7.1). '+' and '#' bytes never occur inside multi-byte UTF-8 sequences.
func topicFilterReason(f string) string {
	if len(f) == 0 {
		return "must not be empty"
	}
	for i := 0; i < len(f); i++ {
		switch f[i] {
		case '#':
			if i != len(f)-1 {
				return "'#' must be last"
			}
			if i > 0 && f[i-1] != '/' {
				return "'#' must be a whole level"
			}
		case '+':
			if (i > 0 && f[i-1] != '/') || (i < len(f)-1 && f[i+1] != '/') {
				return "'+' must be a whole level"
			}
		}
	}
	return ""
}

// matchTopic reports whether topic (a valid topic name) matches filter (a
// valid topic filter). Topics starting with '$' are not matched by filters
// starting with a wildcard (section 4.7.2).
func matchTopic(filter, topic string) bool {
	if topic != "" && topic[0] == '$' && filter != "" && (filter[0] == '+' || filter[0] == '#') {
		return false
	}
	for {
		f, frest, fmore := strings.Cut(filter, "/")
		if f == "#" {
			return true
		}
		t, trest, tmore := strings.Cut(topic, "/")
		if f != "+" && f != t {
			return false
		}
		switch {
		case !fmore && !tmore:
			return true
		case !fmore:
			return false
		case !tmore:
			// "a/#" also matches "a", its parent level.
			return frest == "#"
		}
		filter, topic = frest, trest
	}
}
