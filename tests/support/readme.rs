//! Running a README's shell blocks as written: the blocks marked with an HTML comment
//! (`<!-- readme-test: NAME -->` on the line before a ```` ```sh ```` block), and a guard that ends
//! the process group a block left running.

use std::path::Path;

/// The ```` ```sh ```` blocks of the file `readme` that follow a line equal to `mark`, in order.
pub fn marked_blocks(readme: &Path, mark: &str) -> Vec<String> {
    let text = std::fs::read_to_string(readme)
        .unwrap_or_else(|e| panic!("reading {}: {e}", readme.display()));
    let mut lines = text.lines();
    let mut blocks = vec![];
    while let Some(line) = lines.next() {
        if line.trim() != mark {
            continue;
        }
        assert_eq!(lines.next(), Some("```sh"), "a ```sh block follows {mark}");
        let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        blocks.push(body.join("\n"));
    }
    blocks
}

/// A process group (a script started with `process_group(0)` and whatever it left running):
/// SIGTERM to all of it on drop.
pub struct Group(pub u32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.0)])
            .status();
    }
}
