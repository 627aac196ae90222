//! Zero-copy packet views (filled in by the wire work).
