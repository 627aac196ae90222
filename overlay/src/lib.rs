//! VXLAN overlay (issue 3).
