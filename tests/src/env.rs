//! Where the machine's test services are: the one reading of `TRAINQ_TEST_DATABASE_URL` and
//! `TRAINQ_TEST_REDIS_URL` (see the crate docs for every variable), and the helpers that turn a
//! Postgres URL into the URL of another database on the same server.
//!
//! Must not connect to anything: it only reads the environment and rewrites URLs.

/// The default of `TRAINQ_TEST_DATABASE_URL`: the machine's Postgres, trust authentication.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// The default of `TRAINQ_TEST_REDIS_URL`: the machine's Redis.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// `$TRAINQ_TEST_DATABASE_URL`: a database on the Postgres server the tests use. Tests connect
/// to it only to create and drop databases of their own on that server.
pub fn database_url() -> String {
    std::env::var("TRAINQ_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.into())
}

/// The Postgres server of [`database_url`], as a URL without a database
/// (`postgres://postgres@127.0.0.1:5432`).
pub fn postgres_server_url() -> String {
    server_of(&database_url()).to_owned()
}

/// `$TRAINQ_TEST_REDIS_URL`: the Redis server the tests use, each under a key prefix of its own.
pub fn redis_url() -> String {
    std::env::var("TRAINQ_TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.into())
}

/// The server part of a Postgres URL: without its query and without its database, if it names
/// one (`postgres://u@h:5432/db?x=1` -> `postgres://u@h:5432`).
pub fn server_of(url: &str) -> &str {
    let base = url.split('?').next().unwrap_or(url);
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    }
}

/// The URL of database `db` on the server of `url` (which may name a database or not).
pub fn database_on(url: &str, db: &str) -> String {
    format!("{}/{db}", server_of(url))
}

/// The `host:port` of a Postgres URL (`postgres://u@h:5432/db` -> `h:5432`).
pub fn host_port_of(url: &str) -> &str {
    let server = server_of(url);
    let authority = server.find("://").map_or(server, |i| &server[i + 3..]);
    authority.rsplit_once('@').map_or(authority, |(_, hp)| hp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_database_and_address_of_a_postgres_url() {
        let url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable";
        assert_eq!(server_of(url), "postgres://postgres@127.0.0.1:5432");
        assert_eq!(server_of("postgres://p@h:1"), "postgres://p@h:1");
        assert_eq!(
            database_on(url, "trainq_test_x"),
            "postgres://postgres@127.0.0.1:5432/trainq_test_x"
        );
        assert_eq!(database_on("postgres://p@h:1", "d"), "postgres://p@h:1/d");
        assert_eq!(host_port_of(url), "127.0.0.1:5432");
        assert_eq!(host_port_of("postgres://h:7/db"), "h:7");
    }
}
