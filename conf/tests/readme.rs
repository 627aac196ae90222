//! The configuration shown in README.md is a real, valid configuration.

#[test]
fn readme_config_example_parses_and_validates() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md next to the workspace");
    let start = readme
        .find("```toml\n[node]")
        .expect("a ```toml block starting with [node]")
        + 8;
    let end = start + readme[start..].find("```").expect("the block's end");
    let config = conf::Config::parse(&readme[start..end])
        .unwrap_or_else(|e| panic!("the README's config does not load: {e}"));
    assert_eq!(config.node.name, "node-1");
    assert_eq!(config.peers.len(), 1);
    assert_eq!(config.services.len(), 1);
    assert_eq!(config.dns.nameservers.len(), 1);
    // Its Service's endpoints are on its own nodes.
    assert_eq!(config.endpoint_warnings(), Vec::<String>::new());
}
