//! Stop strings over streamed text.
//!
//! Generation decodes text piece by piece; a stop string may arrive split across pieces
//! (`"<|im"` then `"_end|>"`). [`StopStrings::push`] releases at once every byte that cannot be
//! the start of a stop string and holds back only a tail that still could be, so a streaming
//! client never sees a stop string nor has to wait longer than necessary.

/// What [`StopStrings::push`] lets through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopResult {
    /// Text that is safe to emit now. When `stopped`, everything before the stop string.
    pub text: String,
    /// A stop string was found; generation should end and later pushes return nothing.
    pub stopped: bool,
}

/// Watches streamed text for any of a set of stop strings.
#[derive(Clone, Debug, Default)]
pub struct StopStrings {
    /// The stop strings, empty ones dropped.
    stops: Vec<String>,
    /// Text received but not yet released: a suffix that is a proper prefix of some stop string.
    held: String,
    /// A stop string has been seen.
    stopped: bool,
}

impl StopStrings {
    /// Watches for `stops`. Empty strings are ignored (they would stop before the first token).
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        StopStrings { stops, held: String::new(), stopped: false }
    }

    /// Whether there is nothing to watch for (every push passes straight through).
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Whether a stop string has been seen.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Takes the next decoded piece and returns what may be emitted now.
    pub fn push(&mut self, new_text: &str) -> StopResult {
        if self.stopped {
            return StopResult { text: String::new(), stopped: true };
        }
        self.held.push_str(new_text);
        // The earliest stop string wins: everything from its start on is dropped.
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            self.held.truncate(at);
            self.stopped = true;
            return StopResult { text: std::mem::take(&mut self.held), stopped: true };
        }
        let keep_from = self.partial_match_start();
        let rest = self.held.split_off(keep_from);
        StopResult { text: std::mem::replace(&mut self.held, rest), stopped: false }
    }

    /// Releases whatever is held back (call once generation ends without a stop string).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Start of the longest suffix of `held` that is a proper prefix of a stop string, or
    /// `held.len()` if there is none. Only the last `longest stop - 1` bytes can qualify.
    fn partial_match_start(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let first = self.held.len().saturating_sub(longest.saturating_sub(1));
        (first..self.held.len())
            .filter(|&i| self.held.is_char_boundary(i))
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(list: &[&str]) -> StopStrings {
        StopStrings::new(list.iter().map(|s| s.to_string()).collect())
    }

    fn emitted(text: &str) -> StopResult {
        StopResult { text: text.into(), stopped: false }
    }

    #[test]
    fn stop_string_split_across_pieces() {
        let mut s = stops(&["<|im_end|>"]);
        assert_eq!(s.push("Paris.<|im"), emitted("Paris."));
        assert_eq!(s.push("_end"), emitted(""));
        assert_eq!(s.push("|>\nmore"), StopResult { text: "".into(), stopped: true });
        assert!(s.is_stopped());
        assert_eq!(s.push("after"), StopResult { text: "".into(), stopped: true });
        assert_eq!(s.flush(), "");
    }

    #[test]
    fn stop_string_inside_one_piece_cuts_the_rest() {
        let mut s = stops(&["END"]);
        assert_eq!(s.push("abc END def"), StopResult { text: "abc ".into(), stopped: true });
    }

    #[test]
    fn false_partial_match_is_released() {
        let mut s = stops(&["END"]);
        assert_eq!(s.push("the EN"), emitted("the "));
        assert_eq!(s.push("D"), StopResult { text: "".into(), stopped: true });

        let mut s = stops(&["END"]);
        assert_eq!(s.push("EN"), emitted(""));
        assert_eq!(s.push("X E"), emitted("ENX "));
        assert_eq!(s.flush(), "E");
    }

    #[test]
    fn overlapping_prefix_keeps_only_what_can_still_match() {
        // "aab": after "aa" the first 'a' may still start "aab"; after "aaa" only "aa" can.
        let mut s = stops(&["aab"]);
        assert_eq!(s.push("aa"), emitted(""));
        assert_eq!(s.push("a"), emitted("a"));
        assert_eq!(s.push("b"), StopResult { text: "".into(), stopped: true });
    }

    #[test]
    fn several_stop_strings_earliest_wins() {
        let mut s = stops(&["\n\n", "User:", "###"]);
        assert_eq!(s.push("one\n"), emitted("one"));
        assert_eq!(s.push("two Us"), emitted("\ntwo "));
        assert_eq!(s.push("er: x ### y"), StopResult { text: "".into(), stopped: true });

        let mut s = stops(&["bc", "abcd"]);
        assert_eq!(s.push("xabcd"), StopResult { text: "x".into(), stopped: true });
    }

    #[test]
    fn no_stop_strings_pass_everything_through() {
        let mut s = StopStrings::new(vec![]);
        assert!(s.is_empty());
        assert_eq!(s.push("anything <|im_end|>"), emitted("anything <|im_end|>"));
        let mut s = stops(&[""]);
        assert!(s.is_empty(), "empty stop strings are dropped");
        assert_eq!(s.push("x"), emitted("x"));
        assert_eq!(s.flush(), "");
    }

    #[test]
    fn unicode_is_held_and_cut_on_char_boundaries() {
        let mut s = stops(&["→ fin", "日本語"]);
        assert_eq!(s.push("café →"), emitted("café "));
        assert_eq!(s.push(" fi"), emitted(""));
        assert_eq!(s.push("x 日本"), emitted("→ fix "));
        assert_eq!(s.push("語!"), StopResult { text: "".into(), stopped: true });

        // A stop string sharing a first byte with held text but not its first char.
        let mut s = stops(&["é!"]);
        assert_eq!(s.push("è"), emitted("è"));
        assert_eq!(s.push("é"), emitted(""));
        assert_eq!(s.flush(), "é");
    }

    #[test]
    fn flush_releases_the_held_tail() {
        let mut s = stops(&["</s>"]);
        assert_eq!(s.push("done </"), emitted("done "));
        assert_eq!(s.flush(), "</");
        assert!(!s.is_stopped());
    }
}
