// Certificates for the TLS tests, made with openssl at test time (none is
// kept in the repository): a CA, two peers it signs for 127.0.0.1, and a
// rogue peer that signs itself.

import { join } from "node:path";

export interface TestCertificates {
  ca: string;
  /** Certificate and key files of each peer, by name. */
  peer(name: "a" | "b" | "rogue"): { cert: string; key: string };
}

async function openssl(args: string[]): Promise<void> {
  const proc = Bun.spawn(["openssl", ...args], { stdout: "ignore", stderr: "pipe" });
  const [code, err] = await Promise.all([proc.exited, new Response(proc.stderr).text()]);
  if (code !== 0) throw new Error(`openssl ${args[0]} failed: ${err}`);
}

export async function makeTestCertificates(dir: string): Promise<TestCertificates> {
  const at = (name: string) => join(dir, name);
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
  await openssl(["req", "-x509", ...ec, "-keyout", at("ca.key"), "-out", at("ca.crt"), "-subj", "/CN=sgm test CA", "-days", "2"]);
  const san = at("san.ext");
  await Bun.write(san, "subjectAltName=IP:127.0.0.1\n");
  for (const name of ["a", "b"]) {
    await openssl(["req", ...ec, "-keyout", at(`${name}.key`), "-out", at(`${name}.csr`), "-subj", `/CN=${name}`]);
    await openssl(["x509", "-req", "-in", at(`${name}.csr`), "-CA", at("ca.crt"), "-CAkey", at("ca.key"), "-CAcreateserial", "-out", at(`${name}.crt`), "-days", "2", "-extfile", san]);
  }
  await openssl(["req", "-x509", ...ec, "-keyout", at("rogue.key"), "-out", at("rogue.crt"), "-subj", "/CN=rogue", "-days", "2", "-addext", "subjectAltName=IP:127.0.0.1"]);
  return { ca: at("ca.crt"), peer: (name) => ({ cert: at(`${name}.crt`), key: at(`${name}.key`) }) };
}
