"""The client keeps its own response types (it imports neither torch nor `server`): they must still
name every field the server sends, and the server's adapter card every field its registry knows."""

from __future__ import annotations

import dataclasses

from adapters import AdapterInfo as RegistryInfo
from client.types import AdapterInfo
from server.http.api_models import AdapterCard


def test_the_clients_adapter_info_has_the_servers_fields():
    assert set(AdapterInfo.model_fields) == set(AdapterCard.model_fields)


def test_the_servers_adapter_card_carries_every_public_registry_field():
    public = {f.name for f in dataclasses.fields(RegistryInfo)} - {"source"}  # source: a path on the server
    assert public <= set(AdapterCard.model_fields)
    info = RegistryInfo("a", 4, ["q_proj"], 10, pinned=True, slot=1, in_host_memory=True, source="/srv/a")
    card = AdapterCard.of(info, persisted=False)
    assert card.model_dump() == {
        **{name: getattr(info, name) for name in public},
        "persisted": False,
        "compression": None,
        "resolved_from": None,
    }
