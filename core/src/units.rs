//! A layer's chosen units as sorted, disjoint half-open ranges.
//!
//! A layer may have millions of units and a job names them as ranges, so the ranges are
//! the representation: counting, bounds checks and membership never walk units, and a
//! submitter's ranges are parsed (refusing empty, reversed, unsorted or overlapping ones)
//! before anything is allocated per unit.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Error, Result};

/// Sorted, disjoint, non-empty half-open ranges `[start, end)` of unit indices, adjacent
/// ones merged. Stored and sent as a list of `[start, end]` pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct UnitRanges {
    ranges: Vec<(u32, u32)>,
}

impl UnitRanges {
    /// Parses ranges as a submitter wrote them, refusing empty or reversed ranges and
    /// ranges that are not sorted and disjoint; adjacent ranges are merged.
    pub fn new(ranges: &[(u32, u32)]) -> Result<UnitRanges> {
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
        for &(start, end) in ranges {
            if start >= end {
                let what = if start == end { "empty" } else { "reversed" };
                return Err(Error::invalid("units", format!("unit range {start}..{end} is {what} (ranges are half-open)")));
            }
            match out.last_mut() {
                Some((_, last_end)) if *last_end == start => *last_end = end,
                Some(&mut (a, b)) if start < b => {
                    let problem = if end > a { format!("{start}..{end} overlaps {a}..{b}") } else { format!("{start}..{end} is listed after {a}..{b}") };
                    return Err(Error::invalid("units", format!("unit ranges must be sorted and disjoint: {problem}")));
                }
                _ => out.push((start, end)),
            }
        }
        Ok(UnitRanges { ranges: out })
    }

    /// The units `start..end`; empty when `start >= end`.
    pub fn range(start: u32, end: u32) -> UnitRanges {
        UnitRanges { ranges: if start < end { vec![(start, end)] } else { Vec::new() } }
    }

    /// How many units.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|&(a, b)| u64::from(b - a)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The units in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges.iter().flat_map(|&(a, b)| a..b)
    }

    /// The largest unit.
    pub fn last(&self) -> Option<u32> {
        self.ranges.last().map(|&(_, end)| end - 1)
    }

    pub fn contains(&self, unit: u32) -> bool {
        let i = self.ranges.partition_point(|&(_, end)| end <= unit);
        self.ranges.get(i).is_some_and(|&(start, _)| start <= unit)
    }

    /// The ranges `[start, end)`, sorted, disjoint and not adjacent.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }
}

/// Any list of units, in any order, repeats dropped.
impl From<Vec<u32>> for UnitRanges {
    fn from(mut units: Vec<u32>) -> UnitRanges {
        units.sort_unstable();
        units.dedup();
        UnitRanges { ranges: to_ranges(&units) }
    }
}

/// Sorted, distinct indices as half-open ranges `[start, end)`.
pub fn to_ranges(sorted: &[u32]) -> Vec<(u32, u32)> {
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for &u in sorted {
        match ranges.last_mut() {
            Some((_, end)) if *end == u => *end = u + 1,
            _ => ranges.push((u, u + 1)),
        }
    }
    ranges
}

impl Serialize for UnitRanges {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.ranges.serialize(s)
    }
}

impl<'de> Deserialize<'de> for UnitRanges {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let ranges = Vec::<(u32, u32)>::deserialize(d)?;
        UnitRanges::new(&ranges).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err(ranges: &[(u32, u32)]) -> String {
        UnitRanges::new(ranges).unwrap_err().to_string()
    }

    #[test]
    fn bad_ranges_are_refused_with_the_ranges_named() {
        assert!(err(&[(0, 5), (3, 8)]).contains("unit ranges must be sorted and disjoint: 3..8 overlaps 0..5"), "{}", err(&[(0, 5), (3, 8)]));
        assert!(err(&[(5, 6), (0, 2)]).contains("0..2 is listed after 5..6"), "{}", err(&[(5, 6), (0, 2)]));
        assert!(err(&[(0, 2), (0, 2)]).contains("0..2 overlaps 0..2"));
        assert!(err(&[(3, 3)]).contains("3..3 is empty"));
        assert!(err(&[(8, 3)]).contains("8..3 is reversed"));
    }

    #[test]
    fn a_huge_range_is_counted_not_walked() {
        let r = UnitRanges::new(&[(0, u32::MAX)]).unwrap();
        assert_eq!(r.len(), u64::from(u32::MAX));
        assert_eq!(r.last(), Some(u32::MAX - 1));
        assert!(r.contains(4_000_000_000) && !r.contains(u32::MAX));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, "[[0,4294967295]]");
        assert_eq!(serde_json::from_str::<UnitRanges>(&json).unwrap(), r);
    }

    #[test]
    fn adjacent_ranges_merge_and_lists_sort() {
        assert_eq!(UnitRanges::new(&[(0, 3), (3, 5), (7, 9)]).unwrap().ranges(), &[(0, 5), (7, 9)]);
        let r = UnitRanges::from(vec![8, 7, 0, 2, 1, 5, 2]);
        assert_eq!(r.ranges(), &[(0, 3), (5, 6), (7, 9)]);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![0, 1, 2, 5, 7, 8]);
        assert!(r.contains(5) && !r.contains(4) && !r.contains(9));
        assert!(serde_json::from_str::<UnitRanges>("[[0,5],[3,8]]").unwrap_err().to_string().contains("3..8 overlaps 0..5"));
    }

    proptest! {
        #[test]
        fn parsing_gives_sorted_disjoint_ranges_or_an_error(
            ranges in prop::collection::vec((any::<u32>(), any::<u32>()), 0..8),
            small in prop::collection::vec((0u32..40, 0u32..40), 0..8),
            gaps in prop::collection::vec((0u32..5, 1u32..10), 0..8),
        ) {
            // Ranges laid end to end with gaps (0: adjacent), which parse.
            let mut end = 0;
            let laid: Vec<(u32, u32)> = gaps.iter().map(|&(gap, len)| { let start = end + gap; end = start + len; (start, end) }).collect();
            prop_assert!(UnitRanges::new(&laid).is_ok());
            for ranges in [ranges, small, laid] {
                let Ok(parsed) = UnitRanges::new(&ranges) else { continue };
                let r = parsed.ranges();
                prop_assert!(r.iter().all(|&(a, b)| a < b));
                prop_assert!(r.windows(2).all(|w| w[0].1 < w[1].0), "sorted, disjoint and merged: {:?}", r);
                let expected: u64 = ranges.iter().map(|&(a, b)| u64::from(b - a)).sum();
                prop_assert_eq!(parsed.len(), expected);
                if expected < 10_000 {
                    let units: Vec<u32> = parsed.iter().collect();
                    prop_assert!(units.windows(2).all(|w| w[0] < w[1]));
                    prop_assert_eq!(units.len() as u64, expected);
                    prop_assert_eq!(units.last().copied(), parsed.last());
                    prop_assert!(units.iter().all(|&u| parsed.contains(u)));
                    prop_assert_eq!(UnitRanges::from(units), parsed.clone());
                }
                let json = serde_json::to_string(&parsed).unwrap();
                prop_assert_eq!(serde_json::from_str::<UnitRanges>(&json).unwrap(), parsed);
            }
        }

        #[test]
        fn any_list_of_units_round_trips(units in prop::collection::vec(0u32..200, 0..100)) {
            let r = UnitRanges::from(units.clone());
            let mut expected = units;
            expected.sort_unstable();
            expected.dedup();
            prop_assert_eq!(r.iter().collect::<Vec<_>>(), expected.clone());
            prop_assert_eq!(r.len(), expected.len() as u64);
            for u in 0..201 {
                prop_assert_eq!(r.contains(u), expected.contains(&u));
            }
        }

        #[test]
        fn decoding_any_json_pairs_never_panics(pairs in prop::collection::vec((any::<i64>(), any::<i64>()), 0..6)) {
            let json = serde_json::to_string(&pairs).unwrap();
            if let Ok(r) = serde_json::from_str::<UnitRanges>(&json) {
                prop_assert!(r.ranges().windows(2).all(|w| w[0].1 < w[1].0));
            }
        }
    }
}
