//! The object layer the S3 store is built on (issue 14, `docs/scale-out.md`): one bucket
//! and prefix of an S3-compatible object storage, reached through the `object_store`
//! crate, with the few operations the layout needs and errors a person can act on.
//!
//! - Where: `s3://BUCKET/PREFIX` ([`S3Location::parse`]); the endpoint, region and
//!   credentials from the usual `AWS_*` variables ([`S3Options::from_env`]), the
//!   endpoint overridden by `--s3-endpoint`.
//! - What: [`Objects::put_if_absent`] (`If-None-Match: *`; an existing object is
//!   [`Created::AlreadyExists`], never an error, since it is how a version number is
//!   decided), [`Objects::put`] (one request, or a multipart upload above
//!   [`MULTIPART_ABOVE`]), [`Objects::get`], [`Objects::get_range`], [`Objects::head`]
//!   and [`Objects::delete`], and [`Objects::upload`] for an object sent a part at a
//!   time by its caller; [`Objects::list`], for the garbage collector only (the one
//!   operation whose cost grows with the bucket: nothing on the hot path lists).
//! - Counted: every request this layer makes ([`Objects::requests`]), so the requests of
//!   an operation can be measured and documented.
//! - Errors: each names the bucket, the prefix and the endpoint, and says what to check;
//!   the secret key is never part of one (removed from every message, should the client
//!   ever quote it).
//!
//! The store that lays versions out on this layer is `super::s3` (slice 2 of issue 14).

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};

use crate::{Error, Result};

/// Objects larger than this are uploaded in parts (one request per part, plus the
/// start and the completion): S3 refuses single PUTs above 5 GiB, and parts are
/// retried one by one.
pub const MULTIPART_ABOVE: usize = 64 << 20;

/// The size of each part of a multipart upload (S3's minimum is 5 MiB).
pub const PART_SIZE: usize = 16 << 20;

/// `s3://BUCKET/PREFIX`: where a store's objects live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    /// The bucket.
    pub bucket: String,
    /// The prefix every key is under, without leading or trailing `/` (may be empty).
    pub prefix: String,
}

impl S3Location {
    /// Parses `s3://BUCKET` or `s3://BUCKET/PREFIX`.
    pub fn parse(url: &str) -> Result<S3Location> {
        let usage = |why: &str| {
            Error::Usage(format!(
                "{url:?} is not an object storage location: {why}; write s3://BUCKET/PREFIX (for example s3://backups/sqlferry)"
            ))
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| usage("it does not start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // S3's bucket rules: 3 to 63 lowercase letters, digits, dots and hyphens,
        // starting and ending with a letter or digit.
        let edge_ok =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if bucket.len() < 3
            || bucket.len() > 63
            || !bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
            || !edge_ok(bucket.chars().next())
            || !edge_ok(bucket.chars().last())
        {
            return Err(usage(&format!(
                "the bucket name {bucket:?} is not valid (3 to 63 lowercase letters, digits, dots and hyphens)"
            )));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|part| part == "." || part == "..")
            || prefix.contains("//")
            || prefix.chars().any(|c| c.is_control())
        {
            return Err(usage(&format!(
                "the prefix {prefix:?} may not hold empty, `.` or `..` parts or control characters"
            )));
        }
        Ok(S3Location {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

impl std::fmt::Display for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// How to reach the object storage: endpoint, region, credentials.
#[derive(Clone, Default)]
pub struct S3Options {
    /// The endpoint URL (`http://127.0.0.1:8333`) of an S3-compatible server; `None`
    /// for AWS itself.
    pub endpoint: Option<String>,
    /// The region; `us-east-1` when none is given (what S3-compatible servers accept).
    pub region: Option<String>,
    /// The access key id.
    pub access_key_id: Option<String>,
    /// The secret access key: never printed.
    pub secret_access_key: Option<String>,
    /// A session token for temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "…"),
            )
            .field("session_token", &self.session_token.as_ref().map(|_| "…"))
            .finish()
    }
}

impl S3Options {
    /// The usual variables: `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`), `AWS_REGION` (or
    /// `AWS_DEFAULT_REGION`), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`; `endpoint` (`--s3-endpoint`) wins over the variables.
    pub fn from_env(endpoint: Option<&str>) -> S3Options {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        };
        S3Options {
            endpoint: endpoint
                .map(str::to_owned)
                .or_else(|| var(&["AWS_ENDPOINT_URL", "AWS_ENDPOINT"])),
            region: var(&["AWS_REGION", "AWS_DEFAULT_REGION"]),
            access_key_id: var(&["AWS_ACCESS_KEY_ID"]),
            secret_access_key: var(&["AWS_SECRET_ACCESS_KEY"]),
            session_token: var(&["AWS_SESSION_TOKEN"]),
        }
    }
}

impl S3Options {
    /// What to add to an error of a store opened with these options: without keys in
    /// the environment the S3 client asks the instance metadata service for some, and
    /// its error names only that address.
    pub fn credentials_hint(&self) -> &'static str {
        match self.access_key_id.is_some() {
            true => "",
            false => {
                " (no credentials were given: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            }
        }
    }
}

/// What [`Objects::put_if_absent`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// The object did not exist; this call created it.
    Created,
    /// The object existed already (412 Precondition Failed); nothing was written.
    AlreadyExists,
}

/// The requests an [`Objects`] made, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// PUTs: whole objects, and each request of a multipart upload (start, parts,
    /// completion).
    pub put: u64,
    /// GETs, whole or ranged.
    pub get: u64,
    /// HEADs.
    pub head: u64,
    /// DELETEs.
    pub delete: u64,
    /// LISTs (none on the hot path).
    pub list: u64,
}

#[derive(Default)]
struct Counters {
    put: AtomicU64,
    get: AtomicU64,
    head: AtomicU64,
    delete: AtomicU64,
    list: AtomicU64,
}

/// One object as [`Objects::list`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its key, relative to the store's prefix (`packs/….pack`).
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written (`LastModified`, Unix seconds by the storage's clock).
    pub modified: i64,
}

/// One bucket and prefix of an object storage.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    location: S3Location,
    /// The endpoint as users named it, for messages ("AWS S3" when none).
    endpoint: String,
    /// Removed from every message.
    secret: Option<String>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Objects({} at {})", self.location, self.endpoint)
    }
}

impl Objects {
    /// The objects under `location`, reached as `options` say. Makes no request:
    /// an unreachable endpoint or a wrong key shows at the first operation.
    pub fn open(location: S3Location, options: &S3Options) -> Result<Objects> {
        let endpoint_text = options
            .endpoint
            .clone()
            .unwrap_or_else(|| "AWS S3".to_owned());
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&location.bucket)
            .with_region(options.region.as_deref().unwrap_or("us-east-1"))
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            // Bounded: a server that is down fails an operation in seconds, not minutes.
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: 3,
                retry_timeout: Duration::from_secs(20),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(120)),
            );
        if let Some(endpoint) = &options.endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(Error::Usage(format!(
                    "the object storage endpoint {endpoint:?} is not a URL: give http://HOST:PORT or https://HOST (--s3-endpoint or AWS_ENDPOINT_URL)"
                )));
            }
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                // S3-compatible servers name the bucket in the path.
                .with_virtual_hosted_style_request(false);
        }
        if let Some(id) = &options.access_key_id {
            builder = builder.with_access_key_id(id);
        }
        if let Some(secret) = &options.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if let Some(token) = &options.session_token {
            builder = builder.with_token(token);
        }
        let store = builder.build().map_err(|e| {
            Error::Usage(format!(
                "cannot set up the object storage {location} at {endpoint_text}: {e}; check --s3-endpoint and the AWS_* variables"
            ))
        })?;
        Ok(Objects {
            store: Arc::new(store),
            location,
            endpoint: endpoint_text,
            secret: options.secret_access_key.clone(),
            counters: Arc::default(),
        })
    }

    /// Where these objects live.
    pub fn location(&self) -> &S3Location {
        &self.location
    }

    /// The requests made so far.
    pub fn requests(&self) -> RequestCounts {
        let c = &self.counters;
        RequestCounts {
            put: c.put.load(Ordering::Relaxed),
            get: c.get.load(Ordering::Relaxed),
            head: c.head.load(Ordering::Relaxed),
            delete: c.delete.load(Ordering::Relaxed),
            list: c.list.load(Ordering::Relaxed),
        }
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.location.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.location.prefix))
        }
    }

    /// Creates `key` with `data` only if no object of that name exists
    /// (`If-None-Match: *`). Of several racing, exactly one gets
    /// [`Created::Created`].
    pub async fn put_if_absent(&self, key: &str, data: Vec<u8>) -> Result<Created> {
        self.counters.put.fetch_add(1, Ordering::Relaxed);
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&self.path(key), PutPayload::from(data), options)
            .await
        {
            Ok(_) => Ok(Created::Created),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(Created::AlreadyExists),
            Err(e) => Err(self.error("create", key, e)),
        }
    }

    /// Writes `key` (replacing any object of that name): one PUT, or a multipart upload
    /// when `data` is larger than [`MULTIPART_ABOVE`].
    pub async fn put(&self, key: &str, data: Vec<u8>) -> Result<()> {
        let path = self.path(key);
        if data.len() <= MULTIPART_ABOVE {
            self.counters.put.fetch_add(1, Ordering::Relaxed);
            self.store
                .put(&path, PutPayload::from(data))
                .await
                .map_err(|e| self.error("write", key, e))?;
            return Ok(());
        }
        self.counters.put.fetch_add(1, Ordering::Relaxed);
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(|e| self.error("start the upload of", key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let parts = data.len().div_ceil(PART_SIZE) as u64;
        for part in data.chunks(PART_SIZE) {
            writer
                .wait_for_capacity(4)
                .await
                .map_err(|e| self.error("upload", key, e))?;
            writer.write(part);
        }
        self.counters.put.fetch_add(parts + 1, Ordering::Relaxed);
        writer
            .finish()
            .await
            .map_err(|e| self.error("upload", key, e))?;
        Ok(())
    }

    /// Starts a multipart upload of `key`, for an object written a part at a time by
    /// a caller that holds no more than a part in memory ([`Upload`]); the object
    /// appears only when [`Upload::finish`] completes it. One request (counted as a
    /// PUT).
    pub async fn upload(&self, key: &str) -> Result<Upload> {
        self.counters.put.fetch_add(1, Ordering::Relaxed);
        let inner = self
            .store
            .put_multipart(&self.path(key))
            .await
            .map_err(|e| self.error("start the upload of", key, e))?;
        Ok(Upload {
            inner,
            objects: self.clone(),
            key: key.to_owned(),
        })
    }

    /// The whole object `key`; `None` when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.counters.get.fetch_add(1, Ordering::Relaxed);
        let result = match self.store.get(&self.path(key)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.error("read", key, e)),
        };
        let bytes = result
            .bytes()
            .await
            .map_err(|e| self.error("read", key, e))?;
        Ok(Some(Vec::from(bytes)))
    }

    /// Bytes `range` of object `key`; an error when the object is missing or shorter.
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>> {
        self.counters.get.fetch_add(1, Ordering::Relaxed);
        let want = range.end.saturating_sub(range.start);
        let bytes = self
            .store
            .get_range(&self.path(key), range.clone())
            .await
            .map_err(|e| self.error("read", key, e))?;
        if bytes.len() as u64 != want {
            return Err(Error::Verification(format!(
                "{} at {}: object {key} gave {} bytes for bytes {}..{}; the object is shorter than it should be",
                self.location,
                self.endpoint,
                bytes.len(),
                range.start,
                range.end
            )));
        }
        Ok(Vec::from(bytes))
    }

    /// The size of object `key`; `None` when there is none.
    pub async fn head(&self, key: &str) -> Result<Option<u64>> {
        self.counters.head.fetch_add(1, Ordering::Relaxed);
        match self.store.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("look up", key, e)),
        }
    }

    /// Every object whose key starts with `under` (a folder of the store, such as
    /// `packs/`), as a stream: keys relative to the store's prefix, their sizes and
    /// their `LastModified` times (Unix seconds, the storage's clock). Counted as one
    /// LIST per page of up to 1,000 keys, as S3 answers. For the garbage collector
    /// only: its cost grows with the bucket.
    pub fn list(
        &self,
        under: &str,
    ) -> impl futures_util::Stream<Item = Result<Listed>> + Send + 'static {
        use futures_util::StreamExt as _;
        let prefix = self.path(under.trim_end_matches('/'));
        let strip = match self.location.prefix.is_empty() {
            true => String::new(),
            false => format!("{}/", self.location.prefix),
        };
        let this = self.clone();
        let under = under.to_owned();
        self.counters.list.fetch_add(1, Ordering::Relaxed);
        let mut seen = 0u64;
        self.store.list(Some(&prefix)).map(move |item| {
            seen += 1;
            if seen.is_multiple_of(1000) {
                this.counters.list.fetch_add(1, Ordering::Relaxed);
            }
            let meta = item.map_err(|e| this.error("list", &under, e))?;
            let full = meta.location.to_string();
            let key = full.strip_prefix(&strip).unwrap_or(&full).to_owned();
            Ok(Listed {
                key,
                size: meta.size,
                modified: meta.last_modified.timestamp(),
            })
        })
    }

    /// Deletes object `key`; deleting one that is not there is no error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        self.counters.delete.fetch_add(1, Ordering::Relaxed);
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", key, e)),
        }
    }

    /// A failure of `what` on `key`, for a person: what, where, what to check.
    fn error(&self, what: &str, key: &str, e: object_store::Error) -> Error {
        let object = if key.is_empty() {
            String::new()
        } else {
            format!(" object {key} in")
        };
        let place = format!("{}{object} {} at {}", what, self.location, self.endpoint);
        // One line: a server's XML error body may hold line breaks, and an error is
        // printed as one line.
        let mut detail = e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        // Classified before the secret is hidden: a short secret may be part of the
        // words the classification looks for. Hidden wherever it appears, however
        // short: a garbled message is better than a shown secret.
        let lower = detail.to_ascii_lowercase();
        if let Some(secret) = self.secret.as_deref().filter(|s| !s.is_empty()) {
            detail = detail.replace(secret, "[secret]");
        }
        match e {
            object_store::Error::Unauthenticated { .. }
            | object_store::Error::PermissionDenied { .. } => Error::Server(format!(
                "object storage refused the credentials: cannot {place}: {detail}; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and that the key may read and write the bucket)"
            )),
            object_store::Error::NotFound { .. } => {
                Error::NotFound(format!("cannot {place}: it does not exist: {detail}"))
            }
            _ if lower.contains("signaturedoesnotmatch")
                || lower.contains("invalidaccesskeyid")
                || lower.contains("accessdenied") =>
            {
                Error::Server(format!(
                    "object storage refused the credentials: cannot {place}: {detail}; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and that the key may read and write the bucket)"
                ))
            }
            _ if lower.contains("nosuchbucket") => Error::Server(format!(
                "cannot {place}: the bucket {} does not exist; create it, or check the bucket name and the endpoint (--s3-endpoint or AWS_ENDPOINT_URL)",
                self.location.bucket
            )),
            _ if lower.contains("error sending request")
                || lower.contains("connect")
                || lower.contains("dns")
                || lower.contains("timed out") =>
            {
                Error::Server(format!(
                    "cannot reach the object storage: cannot {place}: {detail}; check the endpoint (--s3-endpoint or AWS_ENDPOINT_URL) and that the server is up"
                ))
            }
            _ => Error::Server(format!("object storage failed: cannot {place}: {detail}")),
        }
    }
}

/// A multipart upload started by [`Objects::upload`]: parts of at least 5 MiB (S3's
/// minimum; the last may be shorter) sent one at a time, then completed. Dropped
/// without [`Upload::finish`], the object never appears (the storage discards the
/// parts of an upload never completed, or [`Upload::abort`] does at once).
pub struct Upload {
    inner: Box<dyn object_store::MultipartUpload>,
    objects: Objects,
    key: String,
}

impl Upload {
    /// Sends the next part (one PUT).
    pub async fn part(&mut self, data: Vec<u8>) -> Result<()> {
        self.objects.counters.put.fetch_add(1, Ordering::Relaxed);
        self.inner
            .put_part(PutPayload::from(data))
            .await
            .map_err(|e| self.objects.error("upload", &self.key, e))
    }

    /// Completes the upload: the object exists from now on (one PUT-class request).
    pub async fn finish(mut self) -> Result<()> {
        self.objects.counters.put.fetch_add(1, Ordering::Relaxed);
        self.inner
            .complete()
            .await
            .map(|_| ())
            .map_err(|e| self.objects.error("complete the upload of", &self.key, e))
    }

    /// Gives the upload up: the storage drops its parts (one DELETE). Best effort.
    pub async fn abort(mut self) {
        self.objects.counters.delete.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.inner.abort().await {
            tracing::debug!(key = %self.key, error = %e, "could not abort an upload");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_print() {
        let l = S3Location::parse("s3://my-bucket/some/prefix/").unwrap();
        assert_eq!(l.bucket, "my-bucket");
        assert_eq!(l.prefix, "some/prefix");
        assert_eq!(l.to_string(), "s3://my-bucket/some/prefix");
        let l = S3Location::parse("s3://my-bucket").unwrap();
        assert_eq!(l.prefix, "");
        assert_eq!(l.to_string(), "s3://my-bucket");
        for bad in [
            "my-bucket/x",
            "s3://",
            "s3://ab/x",
            "s3://Upper/x",
            "s3://-dash/x",
            "s3://b_u_c/x",
            "s3://bucket/a/../b",
            "s3://bucket/a//b",
            "file:///tmp/x",
        ] {
            let e = S3Location::parse(bad).unwrap_err();
            assert!(e.to_string().contains("s3://BUCKET/PREFIX"), "{bad}: {e}");
        }
    }

    #[test]
    fn options_never_show_the_secret() {
        let o = S3Options {
            secret_access_key: Some("hunter2-very-secret".into()),
            access_key_id: Some("AKID".into()),
            ..S3Options::default()
        };
        let text = format!("{o:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("AKID"), "{text}");
    }

    #[test]
    fn an_error_never_shows_the_secret_and_a_short_one_does_not_hide_its_kind() {
        let objects = |secret: &str| {
            let o = S3Options {
                endpoint: Some("http://127.0.0.1:9".into()),
                access_key_id: Some("AKID".into()),
                secret_access_key: Some(secret.into()),
                ..S3Options::default()
            };
            Objects::open(S3Location::parse("s3://bucket/p").unwrap(), &o).unwrap()
        };
        let refusal = |secret: &str| object_store::Error::Generic {
            store: "S3",
            source: format!("AccessDenied: signed with {secret}").into(),
        };
        for secret in ["hunter2-very-secret", "ccess", "d"] {
            let e = objects(secret).error("read", "k", refusal(secret));
            let text = e.to_string();
            assert!(
                !text.contains(&format!("with {secret}")),
                "{secret}: {text}"
            );
            assert!(text.contains("with [secret]"), "{secret}: {text}");
            assert!(
                text.contains("object storage refused the credentials"),
                "{secret}: {text}"
            );
        }
    }

    #[test]
    fn an_endpoint_that_is_not_a_url_is_refused() {
        let o = S3Options {
            endpoint: Some("127.0.0.1:9000".into()),
            ..S3Options::default()
        };
        let e = Objects::open(S3Location::parse("s3://bucket").unwrap(), &o).unwrap_err();
        assert!(e.to_string().contains("--s3-endpoint"), "{e}");
    }
}
