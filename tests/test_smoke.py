from __future__ import annotations

import httpx

from tests.conftest import bearer, make_key, make_org, register


async def test_register_org_key_me(client: httpx.AsyncClient) -> None:
    owner = await register(client)
    org = await make_org(client, owner)
    key = await make_key(client, org)
    r = await client.get("/v1/me", headers=bearer(key["key"]))
    assert r.status_code == 200, r.text
    assert r.json()["organization"]["id"] == org.id
    r = await client.get("/v1/me", headers=owner.headers)
    assert r.status_code == 200, r.text
    assert [o["id"] for o in r.json()["organizations"]] == [org.id]
