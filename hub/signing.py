"""Signatures of adapter versions (OpenSSF model signing) and the trust policy of serving.

    signed = sign_version(registry, "team/sum:3", "release.key")   # -> Signed(manifest, key_id, created)
    checks = check_signatures(registry, manifest, folder, [PublicKey.load("release.pub")])
    policy = TrustPolicy.load("trust.yaml"); policy.check(registry, manifest, folder)

A signature is what the ``model-signing`` library (OpenSSF) writes: a sigstore bundle whose
DSSE envelope holds an in-toto statement naming every file of the model and its sha256
(its "files" serialization), signed with an elliptic-curve key (P-256, P-384 or P-521,
PEM), offline. lorabay signs the verified folder of the version
(``$LORABAY_HOME/cache/<digest>/``, so the statement's subject is the digest) and stores
the bundle beside the manifest, one per key (``keys.signature_key``: ``<version>.sig.<key
id>``, the key id being model-signing's public-key hint, the sha256 of the public key's
PEM). The registry's own digest check says the bytes are the manifest's; the signature says
who vouched for them.

A signature is valid for a version when model-signing verifies it with the public key over
the verified folder (the envelope's signature, then every file's hash) *and* the files it
names are exactly the manifest's (path and sha256): a signature over other content fails
either way, and so does one that leaves a file out.

The trust policy (``lorabay serve --trust FILE``, YAML)::

    keys:                        # a name for each public key (PEM; paths relative to FILE)
      release: keys/release.pub
      team-a: keys/team-a.pub
    rules:                       # the first rule whose pattern matches the name decides
      - names: ["team-a/*"]
        signers: [team-a, release]
      - names: ["*"]
        signers: [release]

Patterns are shell-style, matched against the adapter's name, as ``--api-keys`` does. An
adapter no rule covers, unsigned, signed only by keys its rule does not name, or whose
allowed signature does not hold, is refused (``UntrustedAdapter``, with the reason).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorabay.hub.errors import ConfigError, UntrustedAdapter
from lorabay.hub.events import write_event
from lorabay.hub.keys import name_prefix, signature_key
from lorabay.hub.manifest import Manifest

PASSWORD_ENV = "LORABAY_SIGNING_KEY_PASSWORD"
MAKE_KEY = (
    "make one with `openssl ecparam -name prime256v1 -genkey -noout -out KEY`, "
    "its public half with `openssl ec -in KEY -pubout -out KEY.pub`"
)


def key_id_of(public_key) -> str:
    """model-signing's hint for a public key: sha256 of its SubjectPublicKeyInfo PEM."""
    from cryptography.hazmat.primitives import serialization

    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()


def check_curve(key, path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    curves = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
    if not isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) or not (
        isinstance(key.curve, curves)
    ):
        raise ConfigError(f"{path} is not an elliptic-curve key on P-256, P-384 or P-521", MAKE_KEY)


@dataclass(frozen=True)
class PublicKey:
    path: Path
    key_id: str
    name: str = ""  # as the trust policy names it

    @classmethod
    def load(cls, path: str | os.PathLike, name: str = "") -> PublicKey:
        from cryptography.hazmat.primitives import serialization

        path = Path(path).expanduser()
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"public key {path} does not exist", MAKE_KEY) from None
        except (ValueError, TypeError, OSError) as error:
            raise ConfigError(f"{path} is not a PEM public key ({error})", MAKE_KEY) from None
        check_curve(key, path)
        return cls(path, key_id_of(key), name)

    @property
    def shown(self) -> str:
        return f"{self.name} ({self.key_id[:16]})" if self.name else self.key_id[:16]


def load_private_key(path: str | os.PathLike, password: str | None) -> str:
    """The key id of the private key at ``path``, checked loadable (one-line errors)."""
    from cryptography.hazmat.primitives import serialization

    path = Path(path).expanduser()
    try:
        key = serialization.load_pem_private_key(
            path.read_bytes(), password.encode() if password else None
        )
    except FileNotFoundError:
        raise ConfigError(f"signing key {path} does not exist", MAKE_KEY) from None
    except TypeError:
        raise ConfigError(
            f"signing key {path} is encrypted", f"give its password in ${PASSWORD_ENV}"
        ) from None
    except (ValueError, OSError) as error:
        raise ConfigError(
            f"{path} is not a PEM private key, or the password is wrong ({error})", MAKE_KEY
        ) from None
    check_curve(key, path)
    return key_id_of(key.public_key())


def signed_files(bundle: bytes) -> dict[str, str]:
    """path -> sha256 of the files a bundle's statement names (read, not checked)."""
    envelope = json.loads(bundle)["dsseEnvelope"]
    statement = json.loads(base64.b64decode(envelope["payload"]))
    return {str(r["name"]): str(r["digest"]) for r in statement["predicate"]["resources"]}


def files_match(bundle: bytes, manifest: Manifest) -> str | None:
    """Why the files a signature names are not the manifest's, or None when they are."""
    try:
        signed = signed_files(bundle)
    except (ValueError, KeyError, TypeError) as error:
        return f"it is not a model-signing bundle ({type(error).__name__}: {error})"
    expected = {f["path"]: f["sha256"] for f in manifest.files}
    if signed == expected:
        return None
    for path in sorted(set(signed) | set(expected)):
        if path not in signed:
            return f"it does not cover {path}"
        if path not in expected:
            return f"it covers {path}, which {manifest.ref} does not have"
        if signed[path] != expected[path]:
            return f"it was made over other content ({path}: sha256:{signed[path][:16]}...)"
    return "its file list differs"


def verify_bundle(bundle: bytes, folder: Path, manifest: Manifest, key: PublicKey) -> str | None:
    """Why ``bundle`` is not a valid signature by ``key`` of ``manifest``'s content at
    ``folder`` (the verified cache folder), or None when it is."""
    from model_signing import verifying

    with tempfile.TemporaryDirectory(prefix="lorabay-sig-") as tmp:
        path = Path(tmp) / "signature.json"
        path.write_bytes(bundle)
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=key.path).verify(folder, path)
        except Exception as error:  # noqa: BLE001 - model-signing raises ValueError and others
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            return f"model-signing refuses it: {first[:300]}"
    return files_match(bundle, manifest)


@dataclass(frozen=True)
class StoredSignature:
    key: str  # the store key
    key_id: str  # the 32-hex prefix in the store key
    bundle: bytes


def stored_signatures(registry, manifest: Manifest) -> list[StoredSignature]:
    """Every signature stored for ``manifest`` (one listing of its name, one read each)."""
    prefix = f"{name_prefix(manifest.name)}{manifest.version}.sig."
    found = []
    for info in registry.store.list(name_prefix(manifest.name)):
        if info.key.startswith(prefix):
            bundle = registry.store.read(info.key)
            if bundle is not None:
                found.append(StoredSignature(info.key, info.key[len(prefix) :], bundle))
    return found


@dataclass(frozen=True)
class Signed:
    manifest: Manifest
    key_id: str
    created: bool  # False: this key had signed the version already


def sign_version(registry, ref_or_manifest, private_key: str | os.PathLike) -> Signed:
    """Sign a version with the EC private key at ``private_key`` (its password, if any, in
    ``$LORABAY_SIGNING_KEY_PASSWORD``): model-signing over the version's verified folder,
    the bundle stored beside the manifest, a ``signed`` event logged."""
    from model_signing import signing

    password = os.environ.get(PASSWORD_ENV) or None
    key_id = load_private_key(private_key, password)
    manifest = (
        ref_or_manifest
        if isinstance(ref_or_manifest, Manifest)
        else registry.resolve(ref_or_manifest)
    )
    with registry.lease(manifest) as held, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "signature.json"
        signer = signing.Config().use_elliptic_key_signer(
            private_key=Path(private_key).expanduser(), password=password
        )
        signer.sign(held.path, path)
        bundle = path.read_bytes()
    problem = files_match(bundle, manifest)
    if problem:  # the folder was verified against the manifest: this would be a lorabay bug
        raise ConfigError(f"the signature made for {manifest.ref} is wrong: {problem}")
    key = signature_key(manifest.name, manifest.version, key_id)
    created = registry.store.create(key, bundle)
    if not created:  # signed by this key before: keep it, unless it no longer holds
        tagged = registry.store.read_tagged(key)
        if tagged is not None and files_match(tagged[0], manifest) is None:
            return Signed(manifest, key_id, False)
        registry.store.swap(key, bundle, tagged[1] if tagged else None)
    write_event(
        registry.store,
        "signed",
        name=manifest.name,
        version=manifest.version,
        digest=manifest.digest,
        key=key_id[:16],
    )
    return Signed(manifest, key_id, True)


@dataclass(frozen=True)
class SignatureCheck:
    """The signature of one public key on one version."""

    key: PublicKey
    valid: bool
    reason: str  # "" when valid

    def to_dict(self) -> dict:
        return {
            "key": str(self.key.path),
            "key_id": self.key.key_id,
            "valid": self.valid,
            "reason": self.reason,
        }


def check_signatures(
    registry, manifest: Manifest, folder: Path, keys: list[PublicKey]
) -> list[SignatureCheck]:
    """For each key: whether the version carries a valid signature by it, and if not why."""
    stored = {s.key_id: s for s in stored_signatures(registry, manifest)}
    checks = []
    for key in keys:
        signature = stored.get(key.key_id[:32])
        if signature is None:
            others = ", ".join(sorted(k[:16] for k in stored)) or "none"
            checks.append(SignatureCheck(key, False, f"not signed by it (signed by: {others})"))
            continue
        problem = verify_bundle(signature.bundle, folder, manifest, key)
        checks.append(SignatureCheck(key, problem is None, problem or ""))
    return checks


# -- the trust policy -------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    names: tuple[str, ...]
    signers: tuple[str, ...]


@dataclass
class TrustPolicy:
    path: Path
    keys: dict[str, PublicKey]
    rules: list[Rule]

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrustPolicy:
        """Read and check the policy, every problem at once."""
        import yaml

        path = Path(path).expanduser()
        hint = "see `lorabay serve --help` for the trust policy's format"
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"trust policy {path} does not exist", hint) from None
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"trust policy {path} cannot be read: {error}", hint) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"trust policy {path}: expected a mapping with keys and rules", hint)
        problems = [f"unknown field {k!r}" for k in sorted(set(raw) - {"keys", "rules"})]
        keys: dict[str, PublicKey] = {}
        table = raw.get("keys")
        if not isinstance(table, dict) or not table:
            problems.append("keys: expected a mapping of names to public key files")
            table = {}
        for name, file in table.items():
            try:
                keys[str(name)] = PublicKey.load(path.parent / str(file), str(name))
            except ConfigError as error:
                problems.append(f"key {name}: {error.message}")
        rules = []
        entries = raw.get("rules")
        if not isinstance(entries, list) or not entries:
            problems.append("rules: expected a list of {names, signers}")
            entries = []
        for index, entry in enumerate(entries, 1):
            if not isinstance(entry, dict) or set(entry) != {"names", "signers"}:
                problems.append(f"rule {index}: expected exactly names and signers")
                continue
            names, signers = entry["names"], entry["signers"]
            names = [names] if isinstance(names, str) else names
            signers = [signers] if isinstance(signers, str) else signers
            if (
                not isinstance(names, list)
                or not names
                or not all(isinstance(n, str) for n in names)
            ):
                problems.append(f"rule {index}: names must be name patterns")
                continue
            if not isinstance(signers, list) or not signers:
                problems.append(f"rule {index}: signers must name at least one key")
                continue
            unknown = [str(s) for s in signers if str(s) not in table]
            if unknown:
                problems.append(f"rule {index}: signer {unknown[0]!r} is not under keys")
            rules.append(Rule(tuple(names), tuple(str(s) for s in signers)))
        if problems:
            raise ConfigError([f"trust policy {path}: {p}" for p in problems], hint)
        return cls(path, keys, rules)

    def signers_for(self, name: str) -> list[PublicKey] | None:
        """The keys allowed to sign ``name`` (the first matching rule's), None: no rule."""
        for rule in self.rules:
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in rule.names):
                return [self.keys[s] for s in rule.signers]
        return None

    def check(self, registry, manifest: Manifest, folder: Path) -> PublicKey:
        """The allowed signer whose signature holds over the verified ``folder``; else
        UntrustedAdapter with the reason."""
        allowed = self.signers_for(manifest.name)
        ref = manifest.ref
        if allowed is None:
            raise UntrustedAdapter(
                ref,
                "no_rule",
                f"no rule of the trust policy {self.path} covers {manifest.name}",
                "add a rule for it to the trust policy",
            )
        stored = {s.key_id: s for s in stored_signatures(registry, manifest)}
        if not stored:
            raise UntrustedAdapter(ref, "unsigned", "it is not signed")
        problems = []
        for key in allowed:
            signature = stored.get(key.key_id[:32])
            if signature is None:
                continue
            problem = verify_bundle(signature.bundle, folder, manifest, key)
            if problem is None:
                return key
            problems.append(f"the signature by {key.shown} does not hold: {problem}")
        if problems:
            raise UntrustedAdapter(ref, "bad_signature", "; ".join(problems))
        signers = ", ".join(sorted(k[:16] for k in stored))
        names = ", ".join(k.shown for k in allowed)
        raise UntrustedAdapter(
            ref,
            "unknown_signer",
            f"it is signed only by keys the policy does not allow for {manifest.name} "
            f"(signed by {signers}; allowed: {names})",
        )


def signature_summary(registry, manifest: Manifest) -> list[dict]:
    """What ``hub show`` says: each stored signature's key id and time (not checked: that
    needs the public key, ``hub verify --signed-by``)."""
    summary = []
    for signature in stored_signatures(registry, manifest):
        covers = files_match(signature.bundle, manifest) is None
        summary.append({"key_id": signature.key_id, "covers_manifest": covers})
    return summary
