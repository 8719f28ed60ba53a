"""``/v1/templates``: the connection library. Templates are immutable."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from sqlmodel import select

from api_shim.deps import CurrentTenant, PageDep, SessionDep, by_id_or_name
from api_shim.problems import RESPONSES
from models import errors, rules
from models.schemas import TemplateCreate
from models.tables import Template
from models.views import Page, TemplatePublic, template_public

router = APIRouter(prefix="/v1/templates", tags=["templates"], responses=RESPONSES)


@router.post("", status_code=201, response_model=TemplatePublic)
def create_template(body: TemplateCreate, session: SessionDep, tenant: CurrentTenant) -> dict[str, Any]:
    """Add a template to the tenant's connection library."""
    headers = [header.model_dump() for header in body.auth_headers]
    rules.check_template(body.integration_method, body.auth_type, headers)
    row = Template(
        tenant_id=tenant.id,
        name=body.name,
        service_name=body.service_name,
        integration_method=body.integration_method,
        auth_type=body.auth_type,
        auth_headers=headers,
        verbs=rules.normalize_verbs(body.verbs, loc=["verbs"]),
    )
    session.add(row)
    session.commit()
    return template_public(row)


@router.get("", response_model=Page[TemplatePublic])
def list_templates(session: SessionDep, tenant: CurrentTenant, page: PageDep) -> dict[str, Any]:
    """The tenant's templates, oldest first."""
    statement = page.apply(select(Template).where(Template.tenant_id == tenant.id), Template)
    return page.answer(list(session.exec(statement)), template_public)


@router.get("/{template_id}", response_model=TemplatePublic)
def get_template(template_id: str, session: SessionDep, tenant: CurrentTenant) -> dict[str, Any]:
    """One template."""
    return template_public(by_id_or_name(session, Template, template_id, tenant_id=tenant.id))


@router.delete("/{template_id}", status_code=204)
def delete_template(template_id: str, session: SessionDep, tenant: CurrentTenant) -> Response:
    """Remove a template; connections made from it keep their own copy of its rules."""
    session.delete(by_id_or_name(session, Template, template_id, tenant_id=tenant.id))
    session.commit()
    return Response(status_code=204)


@router.api_route("/{template_id}", methods=["PUT", "PATCH"], include_in_schema=False)
def change_template(template_id: str, tenant: CurrentTenant) -> None:
    """Templates cannot change: make a new one."""
    raise errors.TemplateImmutable()
