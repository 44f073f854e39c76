"""A tool whose parameters are nested pydantic models: the `$defs`/`$ref` shape pydantic emits, which
tool_choice "required" once broke (the engine's and the HTTP tests both send it)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)


class Trip(BaseModel):
    origin: City
    destination: City
    stops: list[City] = Field(default_factory=list, max_length=2)
