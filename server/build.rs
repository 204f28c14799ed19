//! Rebuilds the server when a migration changes: `sqlx::migrate!` embeds migrations/ at compile
//! time, and cargo does not know about that directory otherwise.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
