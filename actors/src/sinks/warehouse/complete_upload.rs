//! Completing a multipart upload only if no object has its name yet: S3's
//! `CompleteMultipartUpload` with `If-None-Match: *`, which `object_store` cannot send
//! through the low-level multipart API that exposes upload ids and part ETags (the
//! commit record needs both). [`ConditionalCompleter`] builds that one request itself
//! and signs it with `object_store`'s own SigV4 signer and the bucket's own credential
//! chain, so it reaches the same bucket with the same identity as every other request.
//!
//! The store refuses the completion with `412 Precondition Failed` when an object is
//! already under the name, so a zombie or a second writer can never replace a
//! published file, however their requests interleave.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer};
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector as _, HttpRequest, HttpRequestBody, ReqwestConnector,
};
use object_store::path::Path as Key;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tracing::warn;

const STORE: &str = "S3";

/// What S3 leaves unencoded in a canonical request (RFC 3986's unreserved characters).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The same, keeping the slashes between a key's segments.
const UNRESERVED_PATH: &AsciiSet = &UNRESERVED.remove(b'/');

/// Sends conditional completions to one bucket.
#[derive(Debug)]
pub struct ConditionalCompleter {
    client: HttpClient,
    /// `https://bucket.host` or `https://host/bucket`: where keys are appended.
    bucket_endpoint: String,
    region: String,
}

impl ConditionalCompleter {
    /// A completer for the bucket `builder` is configured for (read before it is built,
    /// so that endpoint, region and addressing style are the ones `object_store` uses).
    pub fn new(builder: &AmazonS3Builder, allow_http: bool) -> object_store::Result<Self> {
        let value = |key| builder.get_config_value(&key).filter(|v| !v.is_empty());
        let bucket = value(AmazonS3ConfigKey::Bucket).unwrap_or_default();
        let region = value(AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".into());
        let virtual_hosted =
            value(AmazonS3ConfigKey::VirtualHostedStyleRequest).is_some_and(|v| v == "true");
        let endpoint = value(AmazonS3ConfigKey::S3Endpoint).or(value(AmazonS3ConfigKey::Endpoint));
        // As `object_store` builds it: an explicit endpoint already names the bucket in
        // virtual-hosted style.
        let bucket_endpoint = match (endpoint, virtual_hosted) {
            (Some(endpoint), true) => endpoint,
            (Some(endpoint), false) => format!("{}/{bucket}", endpoint.trim_end_matches('/')),
            (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        let options = ClientOptions::new().with_allow_http(allow_http);
        Ok(ConditionalCompleter {
            client: ReqwestConnector::default().connect(&options)?,
            bucket_endpoint,
            region,
        })
    }

    /// Completes `upload` of `key` from `parts` (their ETags, in order) unless an
    /// object is already there: then `Error::Precondition`. An upload the store no
    /// longer knows is `Error::NotFound`. A lost connection or a 5xx answer is tried
    /// again, as `object_store` does for its own requests: completing is idempotent, and
    /// a retry of a completion that did apply finds the object there (`Precondition`),
    /// which `publish` recognises by its size.
    pub async fn complete(
        &self,
        s3: Arc<AmazonS3>,
        key: &Key,
        upload: &str,
        parts: &[String],
    ) -> object_store::Result<()> {
        let (mut attempt, mut backoff) = (1, Duration::from_millis(100));
        loop {
            match self.attempt(&s3, key, upload, parts).await {
                Err(Attempt::Transient(error)) if attempt < ATTEMPTS => {
                    warn!(%key, attempt, %error, "completing an upload failed; trying again");
                    tokio::time::sleep(backoff).await;
                    (attempt, backoff) = (attempt + 1, backoff * 2);
                }
                Err(Attempt::Transient(error) | Attempt::Final(error)) => return Err(error),
                Ok(()) => return Ok(()),
            }
        }
    }

    async fn attempt(
        &self,
        s3: &AmazonS3,
        key: &Key,
        upload: &str,
        parts: &[String],
    ) -> Result<(), Attempt> {
        let url = format!(
            "{}/{}?uploadId={}",
            self.bucket_endpoint,
            utf8_percent_encode(key.as_ref(), UNRESERVED_PATH),
            utf8_percent_encode(upload, UNRESERVED)
        );
        let mut request: HttpRequest = http::Request::post(&url)
            .header(http::header::CONTENT_TYPE, "application/xml")
            .body(HttpRequestBody::from(completion_body(parts)))
            .map_err(|e| {
                Attempt::Final(generic(format!("building the completion of {key}: {e}")))
            })?;
        let credential = s3
            .credentials()
            .get_credential()
            .await
            .map_err(Attempt::Final)?;
        AwsAuthorizer::new(&credential, "s3", &self.region)
            .try_authorize(&mut request, None)
            .map_err(Attempt::Final)?;
        // Like `object_store`'s own conditional requests, the condition is sent unsigned.
        request.headers_mut().insert(
            http::header::IF_NONE_MATCH,
            http::HeaderValue::from_static("*"),
        );
        let transient = |e: String| Attempt::Transient(generic(e));
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| transient(format!("completing the upload of {key}: {e}")))?;
        let status = response.status();
        let body = response
            .into_body()
            .bytes()
            .await
            .map_err(|e| transient(format!("reading the completion of {key}: {e}")))?;
        let text = String::from_utf8_lossy(&body);
        // S3 may answer 200 and put the error in the body once it started streaming.
        if status.is_success() && !text.contains("<Error>") {
            return Ok(());
        }
        let source = format!("{status}: {}", text.trim()).into();
        let path = key.to_string();
        let code = |c: &str| text.contains(&format!("<Code>{c}</Code>"));
        Err(if status.as_u16() == 412 || code("PreconditionFailed") {
            Attempt::Final(object_store::Error::Precondition { path, source })
        } else if status.as_u16() == 404 || code("NoSuchUpload") {
            Attempt::Final(object_store::Error::NotFound { path, source })
        } else if status.is_server_error() || code("InternalError") || code("SlowDown") {
            Attempt::Transient(object_store::Error::Generic {
                store: STORE,
                source,
            })
        } else {
            Attempt::Final(object_store::Error::Generic {
                store: STORE,
                source,
            })
        })
    }
}

/// Tries a completion gets before its error is returned.
const ATTEMPTS: u32 = 5;

/// How one try of a completion failed.
enum Attempt {
    /// Worth another try: the connection, or the store, failed.
    Transient(object_store::Error),
    /// The answer stands.
    Final(object_store::Error),
}

fn generic(message: String) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: message.into(),
    }
}

/// The request body: every part by number (from 1) and ETag. ETags are quoted hex from
/// the store; escaping keeps any other byte from breaking the XML.
fn completion_body(parts: &[String]) -> String {
    let mut body = String::from("<CompleteMultipartUpload>");
    for (index, etag) in parts.iter().enumerate() {
        let etag = etag
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        body.push_str(&format!(
            "<Part><PartNumber>{}</PartNumber><ETag>{etag}</ETag></Part>",
            index + 1
        ));
    }
    body.push_str("</CompleteMultipartUpload>");
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_numbers_parts_from_one_in_order() {
        let parts = ["\"a1\"".to_string(), "\"b<2\"".to_string()];
        assert_eq!(
            completion_body(&parts),
            "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>\"a1\"</ETag></Part>\
             <Part><PartNumber>2</PartNumber><ETag>\"b&lt;2\"</ETag></Part></CompleteMultipartUpload>"
        );
    }

    #[test]
    fn the_bucket_endpoint_follows_the_addressing_style() {
        let builder = |path_style: bool| {
            AmazonS3Builder::new()
                .with_bucket_name("wh")
                .with_region("eu-west-1")
                .with_virtual_hosted_style_request(!path_style)
        };
        let at = |b: AmazonS3Builder| ConditionalCompleter::new(&b, true).unwrap().bucket_endpoint;
        assert_eq!(at(builder(true)), "https://s3.eu-west-1.amazonaws.com/wh");
        assert_eq!(at(builder(false)), "https://wh.s3.eu-west-1.amazonaws.com");
        let local = builder(true).with_endpoint("http://127.0.0.1:8333/");
        assert_eq!(at(local), "http://127.0.0.1:8333/wh");
    }
}
