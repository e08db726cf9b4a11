"""Identity routes (DESIGN §3): who am I, and the admin's users and tokens. Thin."""

from __future__ import annotations

from fastapi import APIRouter, Request

from streams_service.access.principal import Caller
from streams_service.access.schemas import (
    CreateToken,
    CreateUser,
    Me,
    TokenCreated,
    TokenList,
    TokenOut,
    UpdateUser,
    UserList,
    UserOut,
)
from streams_service.access.service import AccessService

router = APIRouter(prefix="/v1", tags=["access"])


def _service(request: Request) -> AccessService:
    service: AccessService = request.app.state.services.access
    return service


@router.get("/me", response_model=Me)
async def me(request: Request, who: Caller) -> Me:
    return Me.model_validate(await _service(request).me(who))


@router.get("/users", response_model=UserList)
async def list_users(request: Request, who: Caller) -> UserList:
    return UserList.model_validate({"items": await _service(request).list_users(who)})


@router.post("/users", status_code=201, response_model=UserOut)
async def create_user(body: CreateUser, request: Request, who: Caller) -> UserOut:
    return UserOut.model_validate(await _service(request).create_user(who, body))


@router.patch("/users/{user_id}", response_model=UserOut)
async def update_user(user_id: str, body: UpdateUser, request: Request, who: Caller) -> UserOut:
    return UserOut.model_validate(await _service(request).update_user(who, user_id, body))


@router.get("/users/{user_id}/tokens", response_model=TokenList)
async def list_tokens(user_id: str, request: Request, who: Caller) -> TokenList:
    return TokenList.model_validate({"items": await _service(request).tokens(who, user_id)})


@router.post("/users/{user_id}/tokens", status_code=201, response_model=TokenCreated)
async def create_token(
    user_id: str, request: Request, who: Caller, body: CreateToken | None = None
) -> TokenCreated:
    out = await _service(request).create_token(who, user_id, body or CreateToken())
    return TokenCreated.model_validate(out)


@router.delete("/users/{user_id}/tokens/{token_id}", response_model=TokenOut)
async def revoke_token(user_id: str, token_id: str, request: Request, who: Caller) -> TokenOut:
    return TokenOut.model_validate(await _service(request).revoke_token(who, user_id, token_id))
