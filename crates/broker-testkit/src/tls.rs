//! TLS for integration tests: a throw-away CA with server and client certificates (made with the
//! `openssl` command), and stunnel as a TLS listener on 127.0.0.1 in front of a plain service
//! (RabbitMQ, Kafka), so clients are tested against a real TLS server.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A CA and the certificates it signed, in a directory of their own.
#[derive(Debug)]
pub struct TestCa {
    /// The directory holding every file.
    pub dir: PathBuf,
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    /// The server certificate (PEM), for `localhost` and 127.0.0.1.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate (PEM) signed by the CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// Another CA that signed nothing here (for "wrong CA" tests).
    pub other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl").args(args).current_dir(dir).output().map_err(|e| format!("openssl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
    }
}

impl TestCa {
    /// Makes the CA, the server certificate (`localhost`, `127.0.0.1`), a client certificate
    /// (CN `client`) and an unrelated CA in `dir`.
    pub fn generate(dir: &Path) -> Result<TestCa, String> {
        let ca = |name: &str, cn: &str| {
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN={cn}"),
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.pem"),
                ],
            )
        };
        ca("ca", "broker test CA")?;
        ca("other-ca", "some other CA")?;
        std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
            .map_err(|e| e.to_string())?;
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").map_err(|e| e.to_string())?;
        for (name, cn) in [("server", "localhost"), ("client", "client")] {
            openssl(
                dir,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    &format!("/CN={cn}"),
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                ],
            )?;
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{name}.ext"),
                    "-out",
                    &format!("{name}.pem"),
                ],
            )?;
        }
        Ok(TestCa {
            dir: dir.to_owned(),
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            other_ca: dir.join("other-ca.pem"),
        })
    }
}

/// A stunnel process: TLS on `127.0.0.1:port`, plain TCP to the service behind it. Killed on drop.
#[derive(Debug)]
pub struct Stunnel {
    /// The TLS port on 127.0.0.1.
    pub port: u16,
    child: Child,
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Stunnel {
    /// Whether the `stunnel` command is installed.
    pub fn available() -> bool {
        Command::new("stunnel").arg("-version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
    }

    /// Starts stunnel with `ca`'s server certificate in front of `connect` (`host:port`); with
    /// `require_client_cert`, clients must show a certificate signed by `ca`.
    pub fn start(ca: &TestCa, connect: &str, require_client_cert: bool) -> Result<Stunnel, String> {
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
        Stunnel::start_on(ca, port, connect, require_client_cert)
    }

    /// Like [`Stunnel::start`], on a given port (when the service must advertise it first).
    pub fn start_on(ca: &TestCa, port: u16, connect: &str, require_client_cert: bool) -> Result<Stunnel, String> {
        let verify = if require_client_cert { "verify = 2\n" } else { "" };
        let conf = format!(
            "foreground = yes\npid =\ndebug = 4\noutput = {log}\n[service]\naccept = 127.0.0.1:{port}\nconnect = {connect}\ncert = {cert}\nkey = {key}\nCAfile = {cafile}\n{verify}",
            log = ca.dir.join(format!("stunnel-{port}.log")).display(),
            cert = ca.server_cert.display(),
            key = ca.server_key.display(),
            cafile = ca.ca.display(),
        );
        let conf_path = ca.dir.join(format!("stunnel-{port}.conf"));
        std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
        let child = Command::new("stunnel")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting stunnel: {e}"))?;
        let mut stunnel = Stunnel { port, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(stunnel);
            }
            if let Ok(Some(status)) = stunnel.child.try_wait() {
                return Err(format!("stunnel exited at start: {status}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = stunnel.child.kill();
        Err("stunnel did not listen within 10 s".into())
    }
}
