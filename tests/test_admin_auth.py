"""Authentication of ``POST /admin/reload`` (serving.app): open without a token (loopback only), a bearer token
checked on every call when one is configured (real FastAPI TestClient over the small artifacts of test_app), the
loopback rule that refuses a public bind without a token (pure functions, and ``main()`` exiting before it loads
anything), the token file, and the token kept out of every repr, error and log line."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from features.config import PlatformConfig, ServingConfig, load_config
from serving.app import (AdminAuthRequiredError, AdminTokenError, admin_auth_required, create_app, is_loopback, main,
                         resolve_admin_token)
from test_app import SPEC, world  # noqa: F401  (world: the module fixture with an exported item2vec and a DeepFM)

TOKEN = "tok-3f9a1c7e5b2d4a6f"
KEPT = {"decision": "keep", "model_version": "dfm-1+i2v-1"}     # nothing new on disk: the policy keeps the bundle


@pytest.fixture
def recsys_env(monkeypatch):
    """No RECSYS_* variable from the caller's shell leaks into load_config()."""
    import os

    for key in [k for k in os.environ if k.startswith("RECSYS_")]:
        monkeypatch.delenv(key)
    return monkeypatch


@pytest.fixture(scope="module")
def guarded(world):  # noqa: F811
    with TestClient(create_app(world[0], spec=SPEC, admin_token=SecretStr(TOKEN))) as c:
        yield c


# ------------------------------------------------------------------------------------------------ the endpoint
def test_reload_is_open_without_a_token(world):  # noqa: F811
    app = create_app(world[0], spec=SPEC)
    with TestClient(app) as c:
        r = c.post("/admin/reload")
        assert (r.status_code, r.json()) == (200, KEPT)
    assert "security" not in app.openapi()["paths"]["/admin/reload"]["post"]


def test_reload_needs_the_bearer_token_when_one_is_configured(guarded):
    for headers, why in (({}, "missing"), ({"Authorization": "Bearer wrong"}, "wrong"),
                         ({"Authorization": f"Bearer {TOKEN[:-1]}"}, "wrong"),       # a prefix
                         ({"Authorization": f"Bearer {TOKEN}x"}, "wrong"),           # longer
                         ({"Authorization": f"Bearer {TOKEN.upper()}"}, "wrong"),    # case matters in the token
                         ({"Authorization": TOKEN}, "missing"),                      # no scheme
                         ({"Authorization": f"Basic {TOKEN}"}, "missing"),           # another scheme
                         ({"Authorization": "Bearer "}, "missing"),
                         ({"Authorization": b"Bearer \xc3\xa9\xff"}, "wrong")):      # not ASCII: latin-1 bytes
        r = guarded.post("/admin/reload", headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json()["detail"].startswith(why) and TOKEN not in r.text
    r = guarded.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert (r.status_code, r.json()) == (200, KEPT)
    r = guarded.post("/admin/reload", headers={"Authorization": f"bearer {TOKEN}"})   # the scheme is case-insensitive
    assert (r.status_code, r.json()) == (200, KEPT)


def test_authentication_comes_before_parameters_and_guards_only_the_admin_route(guarded):
    """An unauthenticated caller learns nothing from validation (401, not 422 or 404); reads stay open."""
    assert guarded.post("/admin/reload", params={"version": "../etc"}).status_code == 401
    assert guarded.post("/admin/reload", params={"version": "i2v-404"}).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert guarded.post("/admin/reload", params={"version": "../etc"}, headers=auth).status_code == 422
    assert guarded.post("/admin/reload", params={"version": "i2v-404"}, headers=auth).status_code == 404
    assert guarded.get("/health").json()["model_version"] == "dfm-1+i2v-1"
    assert guarded.get("/similar-items", params={"item_id": 105, "k": 3}).status_code == 200
    metrics = guarded.get("/metrics").text
    assert 'recsys_requests_total{endpoint="/admin/reload",status="401"}' in metrics


def test_openapi_documents_the_401_and_the_bearer_scheme(guarded):
    schema = guarded.get("/openapi.json").json()
    op = schema["paths"]["/admin/reload"]["post"]
    assert "401" in op["responses"] and "Bearer" in op["responses"]["401"]["description"]
    assert op["security"] == [{"HTTPBearer": []}]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_refusals_are_logged_without_the_token(guarded, caplog):
    with caplog.at_level(logging.WARNING, logger="serving.app"):
        guarded.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}-guess"})
    assert any("wrong bearer token" in m for m in caplog.messages)
    assert not any(TOKEN in m for m in caplog.messages)


def test_create_app_refuses_an_empty_token(world):  # noqa: F811
    with pytest.raises(ValueError, match="admin_token is empty"):
        create_app(world[0], spec=SPEC, admin_token=SecretStr(""))


# ------------------------------------------------------------------------------------------------ the bind rule
@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "127.255.255.254", "::1", "[::1]", "localhost",
                                  "LocalHost", "::ffff:127.0.0.1"])
def test_loopback_hosts(host):
    assert is_loopback(host)
    assert admin_auth_required(host, None) is False                  # open, as before tokens existed
    assert admin_auth_required(host, SecretStr(TOKEN)) is True       # a configured token is always enforced


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "192.168.1.20", "128.0.0.1", "::2",
                                  "example.com", "localhost.example.com", "127.0.0.1.nip.io", ""])
def test_hosts_beyond_loopback_need_a_token(host):
    assert not is_loopback(host)
    with pytest.raises(AdminAuthRequiredError) as e:
        admin_auth_required(host, None)
    assert "RECSYS_SERVING__ADMIN_TOKEN" in str(e.value) and "serving.admin_token_file" in str(e.value)
    assert admin_auth_required(host, SecretStr(TOKEN)) is True


def test_main_refuses_a_public_bind_without_a_token_before_loading_anything(recsys_env, tmp_path, capsys):
    """No run dir exists: had main() loaded the bundle it would fail with IndexFileError, not exit 2."""
    absent = tmp_path / "absent"
    recsys_env.setenv("RECSYS_DATA_DIR", str(absent / "data"))
    recsys_env.setenv("RECSYS_ARTIFACTS_DIR", str(absent / "artifacts"))
    with pytest.raises(SystemExit) as e:
        main(["--host", "0.0.0.0", "--port", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("serving.app: error: --host '0.0.0.0' is beyond loopback")
    assert "RECSYS_SERVING__ADMIN_TOKEN" in err and "serving.admin_token_file" in err
    assert not absent.exists()


def test_main_with_a_token_passes_the_bind_rule(recsys_env, tmp_path):
    """With a token a public bind is allowed: main() goes on to load the bundle (here: none exported)."""
    import torch

    from serving.ann import IndexFileError

    recsys_env.setenv("RECSYS_DATA_DIR", str(tmp_path / "data"))
    recsys_env.setenv("RECSYS_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    recsys_env.setenv("RECSYS_SERVING__ADMIN_TOKEN", TOKEN)
    with pytest.raises(IndexFileError):
        main(["--host", "0.0.0.0", "--port", "1", "--threads", str(torch.get_num_threads())])


def test_main_names_an_unreadable_token_file(recsys_env, tmp_path, capsys):
    missing = tmp_path / "no-such-token"
    recsys_env.setenv("RECSYS_SERVING__ADMIN_TOKEN_FILE", str(missing))
    with pytest.raises(SystemExit) as e:
        main(["--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and str(missing) in err


# ------------------------------------------------------------------------------------------------ the token source
def test_token_from_the_environment_and_never_in_a_repr(recsys_env):
    recsys_env.setenv("RECSYS_SERVING__ADMIN_TOKEN", TOKEN)
    cfg = load_config()
    assert cfg.serving.admin_token.get_secret_value() == TOKEN
    assert resolve_admin_token(cfg.serving).get_secret_value() == TOKEN
    for text in (repr(cfg), str(cfg), repr(cfg.serving), cfg.model_dump_json(), repr(cfg.model_dump())):
        assert TOKEN not in text
    assert "**********" in repr(cfg.serving)


def test_token_file_from_yaml(recsys_env, tmp_path):
    token_file = tmp_path / "admin.token"
    token_file.write_text(f"  {TOKEN}\n\n")                         # stripped
    yaml_file = tmp_path / "recsys.yaml"
    yaml_file.write_text(f"serving:\n  admin_token_file: {token_file}\n")
    cfg = load_config(yaml_file)
    assert cfg.serving.admin_token_file == token_file and cfg.serving.admin_token is None
    token = resolve_admin_token(cfg.serving)
    assert token.get_secret_value() == TOKEN and TOKEN not in repr(token)


def test_no_token_configured_is_none():
    assert resolve_admin_token(ServingConfig()) is None
    assert resolve_admin_token(PlatformConfig().serving) is None


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_an_empty_token_file_is_an_error_naming_it(tmp_path, content):
    path = tmp_path / "admin.token"
    path.write_text(content)
    with pytest.raises(AdminTokenError, match="is empty") as e:
        resolve_admin_token(ServingConfig(admin_token_file=path))
    assert str(path) in str(e.value) and "serving.admin_token_file" in str(e.value)


def test_a_missing_or_unreadable_token_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-token"
    with pytest.raises(AdminTokenError, match="No such file") as e:
        resolve_admin_token(ServingConfig(admin_token_file=missing))
    assert str(missing) in str(e.value) and "serving.admin_token_file" in str(e.value)
    with pytest.raises(AdminTokenError, match="Is a directory"):
        resolve_admin_token(ServingConfig(admin_token_file=tmp_path))
    binary = tmp_path / "binary.token"
    binary.write_bytes(b"\xff\xfe" + TOKEN.encode())
    with pytest.raises(AdminTokenError, match="UnicodeDecodeError") as e:
        resolve_admin_token(ServingConfig(admin_token_file=binary))
    assert TOKEN not in str(e.value)


@pytest.mark.parametrize("bad", ["two words", "caf\u00e9-token", "tab\tinside", "   "])
def test_a_token_a_header_cannot_carry_is_refused_without_echoing_it(bad):
    with pytest.raises(AdminTokenError) as e:
        resolve_admin_token(ServingConfig(admin_token=bad))
    assert "RECSYS_SERVING__ADMIN_TOKEN" in str(e.value)
    assert ("is empty" in str(e.value)) if not bad.strip() else (bad not in str(e.value))


def test_both_token_settings_are_an_error(tmp_path):
    path = tmp_path / "admin.token"
    path.write_text(TOKEN)
    with pytest.raises(AdminTokenError, match="keep one") as e:
        resolve_admin_token(ServingConfig(admin_token=TOKEN, admin_token_file=path))
    assert TOKEN not in str(e.value)


def test_an_unknown_serving_key_is_an_error():
    with pytest.raises(ValidationError, match="admin_tokn"):
        PlatformConfig.model_validate({"serving": {"admin_tokn": TOKEN}})
