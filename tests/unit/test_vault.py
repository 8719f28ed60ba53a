"""The vault's promises, as properties: what it seals it opens, for that row and key only, and
no key or plaintext ever shows in a message or a repr."""

from __future__ import annotations

import base64
import os
import string
import traceback
import uuid

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from models import errors
from models.vault import NONCE_BYTES, Sealed, Vault, generate_key, key_id

K1 = os.urandom(32)
K2 = os.urandom(32)
K3 = os.urandom(32)

ROW = {"tenant_id": str(uuid.uuid4()), "connection_id": str(uuid.uuid4()), "name": "client_secret"}

rows = st.fixed_dictionaries({"tenant_id": st.text(), "connection_id": st.text(), "name": st.text()})
secret_names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(string.ascii_letters + "_"),
    st.text(alphabet=string.ascii_letters + string.digits + "_.-", max_size=40),
)
# A plaintext that cannot be part of any (ASCII) message template or secret name by chance,
# so finding it in a message means the message leaked it.
distinctive_plaintexts = st.text(min_size=7).map(lambda text: "\u00a7" + text)

PROPERTY = settings(max_examples=200)


def messages_of(exc: BaseException) -> list[str]:
    """What a log line of ``exc`` shows: each message of its chain, and the whole traceback."""
    texts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        texts.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    return [*texts, "".join(traceback.format_exception(exc))]


# --- round trip ----------------------------------------------------------------------------


@PROPERTY
@given(plaintext=st.text(), row=rows)
@example(plaintext="", row={"tenant_id": "", "connection_id": "", "name": ""})
@example(plaintext="p\u00e4ss w\u00f6rd \u2603 \U0001f511 \x00", row=ROW)
def test_what_is_sealed_opens_to_the_same_text(plaintext: str, row: dict[str, str]) -> None:
    # Given a vault and any text, sealed for any row
    vault = Vault([K1])
    sealed = vault.seal(plaintext, **row)
    # When it is opened for that row
    opened = vault.open(sealed, **row)
    # Then it is the same text, and the stored form names the key and carries a 96-bit nonce
    assert opened == plaintext
    assert sealed.key_id == key_id(K1)
    assert len(sealed.nonce) == NONCE_BYTES
    if len(plaintext.encode()) >= 8:
        assert plaintext.encode() not in sealed.ciphertext


# --- tampering -----------------------------------------------------------------------------


@PROPERTY
@given(plaintext=st.text(), data=st.data())
def test_a_flipped_bit_in_nonce_or_ciphertext_makes_it_unreadable(plaintext: str, data: st.DataObject) -> None:
    # Given a sealed secret
    vault = Vault([K1])
    sealed = vault.seal(plaintext, **ROW)
    stored = bytearray(sealed.nonce + sealed.ciphertext)
    # When one bit anywhere in its nonce or ciphertext is flipped
    index = data.draw(st.integers(0, len(stored) - 1), label="index")
    bit = data.draw(st.integers(0, 7), label="bit")
    stored[index] ^= 1 << bit
    changed = Sealed(sealed.key_id, bytes(stored[:NONCE_BYTES]), bytes(stored[NONCE_BYTES:]))
    # Then opening it fails with SecretUnreadable
    with pytest.raises(errors.SecretUnreadable) as caught:
        vault.open(changed, **ROW)
    assert caught.value.code == "secret_unreadable"


@PROPERTY
@given(plaintext=st.text(), data=st.data())
def test_a_truncated_ciphertext_is_unreadable(plaintext: str, data: st.DataObject) -> None:
    # Given a sealed secret whose ciphertext lost its tail (a damaged row)
    vault = Vault([K1])
    sealed = vault.seal(plaintext, **ROW)
    length = data.draw(st.integers(0, len(sealed.ciphertext) - 1), label="length")
    # When it is opened
    # Then it fails with SecretUnreadable
    with pytest.raises(errors.SecretUnreadable):
        vault.open(sealed._replace(ciphertext=sealed.ciphertext[:length]), **ROW)


@pytest.mark.parametrize("length", [0, 7])
def test_a_truncated_nonce_is_unreadable(length: int) -> None:
    # Given a sealed secret whose stored nonce was cut short (a damaged row)
    vault = Vault([K1])
    sealed = vault.seal("hunter2-secret", **ROW)
    damaged = sealed._replace(nonce=sealed.nonce[:length])
    # When it is opened
    # Then it fails like any other changed secret: SecretUnreadable
    with pytest.raises(errors.SecretUnreadable):
        vault.open(damaged, **ROW)


def test_a_ciphertext_labelled_with_another_configured_key_is_unreadable() -> None:
    # Given a vault with two keys and a secret sealed with the first
    vault = Vault([K1, K2])
    sealed = vault.seal("hunter2-secret", **ROW)
    # When its key id is changed to the other configured key
    # Then it does not open
    with pytest.raises(errors.SecretUnreadable):
        vault.open(sealed._replace(key_id=key_id(K2)), **ROW)


# --- bound to its row ----------------------------------------------------------------------


@PROPERTY
@given(plaintext=st.text(), row=rows, field=st.sampled_from(["tenant_id", "connection_id", "name"]), other=st.text())
def test_a_ciphertext_copied_to_another_row_does_not_open(
    plaintext: str, row: dict[str, str], field: str, other: str
) -> None:
    assume(other != row[field])
    # Given a secret sealed for one row
    vault = Vault([K1])
    sealed = vault.seal(plaintext, **row)
    # When it is opened for a row that differs in its tenant, its connection or its name
    # Then it fails with SecretUnreadable
    with pytest.raises(errors.SecretUnreadable):
        vault.open(sealed, **dict(row, **{field: other}))


@pytest.mark.parametrize(
    "other",
    [
        {"tenant_id": "a", "connection_id": "b,c", "name": "n"},  # same when joined with ","
        {"tenant_id": "a,bc", "connection_id": "", "name": "n"},  # same when concatenated
        {"tenant_id": "a,b", "connection_id": "", "name": "cn"},
        {"tenant_id": "a,b", "connection_id": "c\0", "name": "n"},
        {"tenant_id": 'a,b","c', "connection_id": "", "name": "n"},  # same as naive JSON-ish text
    ],
    ids=["comma-join", "concat", "concat-name", "nul", "quote"],
)
def test_moving_a_separator_between_fields_does_not_make_another_row(other: dict[str, str]) -> None:
    # Given a secret sealed for tenant "a,b", connection "c", name "n"
    vault = Vault([K1])
    sealed = vault.seal("hunter2-secret", tenant_id="a,b", connection_id="c", name="n")
    # When it is opened for a row whose fields join to similar text
    # Then it does not open: the row is encoded without ambiguity
    with pytest.raises(errors.SecretUnreadable):
        vault.open(sealed, **other)


# --- nonces --------------------------------------------------------------------------------


def test_every_encryption_uses_a_fresh_nonce() -> None:
    # Given one plaintext and one row
    vault = Vault([K1])
    # When it is sealed 10,000 times
    sealed = [vault.seal("the same value", **ROW) for _ in range(10_000)]
    # Then every nonce is 12 bytes, and no nonce and no ciphertext repeats
    assert {len(s.nonce) for s in sealed} == {12}
    assert len({s.nonce for s in sealed}) == 10_000
    assert len({s.ciphertext for s in sealed}) == 10_000
    # ... and every one still opens
    assert {vault.open(s, **ROW) for s in sealed[::500]} == {"the same value"}


# --- several keys --------------------------------------------------------------------------


def test_a_new_first_key_still_opens_what_the_old_one_sealed() -> None:
    # Given a secret sealed by a vault with only k1
    sealed = Vault([K1]).seal("hunter2-secret", **ROW)
    # When k2 is put in front of k1
    vault = Vault([K2, K1])
    # Then the old secret opens, and new secrets are sealed with k2
    assert vault.open(sealed, **ROW) == "hunter2-secret"
    assert vault.current_key_id == key_id(K2)
    assert vault.seal("another", **ROW).key_id == key_id(K2)
    assert key_id(K1) != key_id(K2)


def test_a_vault_without_the_sealing_key_cannot_open_and_does_not_say_the_secret() -> None:
    # Given a secret sealed with k1
    sealed = Vault([K1]).seal("hunter2-very-secret", **ROW)
    # When a vault with only k2 and k3 opens it
    with pytest.raises(errors.SecretUnreadable) as caught:
        Vault([K2, K3]).open(sealed, **ROW)
    # Then it is unreadable, and the message names the secret but not its value
    assert "client_secret" in str(caught.value)
    assert all("hunter2" not in text for text in messages_of(caught.value))


def test_reseal_moves_a_secret_to_the_current_key() -> None:
    # Given a secret sealed with k1, and a vault whose current key is k2
    old = Vault([K1]).seal("hunter2-secret", **ROW)
    vault = Vault([K2, K1])
    # When it is resealed
    new = vault.reseal(old, **ROW)
    # Then it is under k2, with a new nonce, and opens to the same value without k1
    assert new.key_id == key_id(K2)
    assert new.nonce != old.nonce
    assert Vault([K2]).open(new, **ROW) == "hunter2-secret"


def test_reseal_leaves_a_current_secret_as_it_is() -> None:
    # Given a secret already sealed with the current key
    vault = Vault([K2, K1])
    sealed = vault.seal("hunter2-secret", **ROW)
    # When it is resealed
    # Then the very same sealed value comes back
    assert vault.reseal(sealed, **ROW) == sealed


def test_reseal_of_a_secret_under_an_unknown_key_is_unreadable() -> None:
    # Given a secret sealed with k3, which the vault does not have
    sealed = Vault([K3]).seal("hunter2-secret", **ROW)
    # When the vault reseals it
    # Then it says the secret is unreadable
    with pytest.raises(errors.SecretUnreadable):
        Vault([K2, K1]).reseal(sealed, **ROW)


# --- configuration -------------------------------------------------------------------------


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@pytest.mark.parametrize("setting", [None, "", "  ", "\n\t"])
def test_no_master_key_is_refused(setting: str | None) -> None:
    # Given HUB_MASTER_KEYS unset or blank
    # When a vault is made from it
    with pytest.raises(errors.MasterKeyMissing) as caught:
        Vault.from_setting(setting)
    # Then the message says how to make one
    assert caught.value.code == "master_key_missing"
    assert "HUB_MASTER_KEYS" in str(caught.value)


def test_an_empty_key_list_is_refused() -> None:
    # Given no keys at all
    # When a vault is made
    # Then it is refused as missing
    with pytest.raises(errors.MasterKeyMissing):
        Vault([])


@pytest.mark.parametrize(
    "setting",
    [
        "not base64!",
        b64(os.urandom(16)),
        b64(os.urandom(31)),
        b64(os.urandom(33)),
        b64(os.urandom(64)),
        f"{b64(K1)},{b64(os.urandom(16))}",
        f"{b64(K1)},",
        f"{b64(K1)},not-base64",
        base64.urlsafe_b64encode(b"\xfb" * 32).decode(),  # "-" and "_" are not base64
        "cl\u00e9",
    ],
    ids=["garbage", "16-bytes", "31-bytes", "33-bytes", "64-bytes", "good-then-short",
         "trailing-comma", "good-then-garbage", "urlsafe", "non-ascii"],
)
def test_an_invalid_master_key_is_refused(setting: str) -> None:
    # Given HUB_MASTER_KEYS that is not a list of base64 32-byte keys
    # When a vault is made from it
    with pytest.raises(errors.InvalidMasterKey) as caught:
        Vault.from_setting(setting)
    # Then it is refused, and no part of the setting is echoed back
    assert caught.value.code == "invalid_master_key"
    for part in setting.split(","):
        if part.strip():
            assert all(part.strip() not in text for text in messages_of(caught.value))


def test_keys_separated_by_commas_and_spaces_are_all_used() -> None:
    # Given two keys written with spaces and a newline around them
    setting = f"  {b64(K2)} ,\n {b64(K1)}  "
    # When a vault is made from the setting
    vault = Vault.from_setting(setting)
    # Then the first seals and both open
    assert vault.current_key_id == key_id(K2)
    old = Vault([K1]).seal("hunter2-secret", **ROW)
    assert vault.open(old, **ROW) == "hunter2-secret"
    assert vault.seal("x", **ROW).key_id == key_id(K2)


def test_a_generated_key_is_a_valid_setting() -> None:
    # Given two keys from generate_key
    first, second = generate_key(), generate_key()
    # When a vault is made from them
    vault = Vault.from_setting(f"{first},{second}")
    # Then they differ, are 32 bytes each, and the vault works
    assert first != second
    assert len(base64.b64decode(first)) == 32
    assert vault.open(vault.seal("v", **ROW), **ROW) == "v"


@settings(max_examples=100)
@given(keys=st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=4))
def test_a_vault_repr_shows_key_ids_but_no_key(keys: list[bytes]) -> None:
    # Given a vault made from any keys
    vault = Vault.from_setting(", ".join(b64(k) for k in keys))
    sealed = vault.seal("hunter2-secret", **ROW)
    # When it is shown (as a log line or a debugger would)
    shown = repr(vault) + str(vault)
    # Then the key ids appear and no key does, in any encoding; nor does a plaintext
    assert key_id(keys[0]) in shown
    for key in keys:
        assert b64(key) not in shown
        assert key.hex() not in shown
        assert repr(key) not in shown
    assert "hunter2" not in shown
    assert vault.open(sealed, **ROW) == "hunter2-secret"


@settings(max_examples=100)
@given(key=st.binary(min_size=8, max_size=64).filter(lambda k: len(k) != 32))
def test_a_key_of_the_wrong_size_is_refused_without_echoing_it(key: bytes) -> None:
    # Given a base64 key of any size but 32 bytes
    setting = b64(key)
    assume(setting.strip())
    # When a vault is made from it
    with pytest.raises(errors.InvalidMasterKey) as caught:
        Vault.from_setting(f"{b64(K1)},{setting}")
    # Then the message does not contain either key
    for text in messages_of(caught.value):
        assert setting not in text
        assert b64(K1) not in text


# --- no plaintext in any message -----------------------------------------------------------


@PROPERTY
@given(plaintext=distinctive_plaintexts, name=secret_names, other_name=secret_names, data=st.data())
def test_no_error_message_contains_the_plaintext(
    plaintext: str, name: str, other_name: str, data: st.DataObject
) -> None:
    assume(name != other_name)
    row = dict(ROW, name=name)
    sealed = Vault([K1]).seal(plaintext, **row)
    index = data.draw(st.integers(0, len(sealed.ciphertext) - 1), label="index")
    tampered = sealed._replace(ciphertext=sealed.ciphertext[:index] + bytes([sealed.ciphertext[index] ^ 1])
                               + sealed.ciphertext[index + 1 :])
    failures = [
        # Given a secret opened for another row, with a changed ciphertext, or without its key
        lambda: Vault([K1]).open(sealed, **dict(row, name=other_name)),
        lambda: Vault([K1]).open(tampered, **row),
        lambda: Vault([K2]).open(sealed, **row),
        lambda: Vault([K2, K3]).reseal(sealed, **row),
        lambda: Vault([K2, K1]).reseal(sealed, **dict(row, name=other_name)),
        lambda: Vault.from_setting(plaintext),
        lambda: Vault.from_setting(f"{b64(K1)},{plaintext}"),
    ]
    for fail in failures:
        # When the operation fails
        with pytest.raises(errors.HubError) as caught:
            fail()
        # Then neither the message nor any chained cause contains the plaintext
        for text in messages_of(caught.value):
            assert plaintext not in text
