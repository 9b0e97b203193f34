"""Docker image names as Vast takes them: checked when a pool is made, not after a rental.

Vast rents an instance with any ``image`` string and fails only when its host pulls it
(minutes later, billed), so a name Docker cannot parse is refused here, with the name and
an example. The grammar is Docker's reference grammar (``distribution/reference``)::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [domain "/"] path-component ["/" path-component]*
    domain     := host [":" port]          (a first component with "." or ":", or "localhost")
    path-component := [a-z0-9]+ (separator [a-z0-9]+)*,   separator := [_.] | "__" | "-"+
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest     := algorithm ":" hex{32,}

extended with Vast's ``:@vastai-automatic-tag`` (in the tag's place), which asks Vast to
pick the image's tag that suits the host's CUDA driver.
"""

from __future__ import annotations

import re

#: what Vast accepts in the tag's place: the tag that suits the host is picked at rent time
VAST_AUTOMATIC_TAG = "@vastai-automatic-tag"
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(
    rf"(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}|{re.escape(VAST_AUTOMATIC_TAG)}))?(?:@(?P<digest>{_DIGEST}))?"
)
#: Docker's limit on the name part (domain and path)
MAX_NAME_LENGTH = 255
EXAMPLES = "'vastai/pytorch:@vastai-automatic-tag', 'pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime', " \
           "'nvcr.io/nvidia/pytorch:24.08-py3'"


def image_name_problem(image: str) -> str | None:
    """Why ``image`` is not an image reference Vast can pull, or None when it is one."""
    if not isinstance(image, str) or not image:
        return "it is empty"
    if any(c.isspace() for c in image):
        return "it contains whitespace"
    match = _REFERENCE.fullmatch(image)
    if match is None:
        if image != image.lower() and _REFERENCE.fullmatch(image.lower()):
            return "repository names are lowercase"
        return "it does not follow Docker's [registry/]repository[:tag][@digest] form"
    domain = match.group("domain")
    if domain is not None and not ("." in domain or ":" in domain or domain == "localhost"):
        # Docker reads such a first component as part of the repository, which is lowercase.
        if domain != domain.lower():
            return "repository names are lowercase"
    name_length = len(domain or "") + bool(domain) + len(match.group("path"))
    if name_length > MAX_NAME_LENGTH:
        return f"its name is {name_length} characters long; Docker allows {MAX_NAME_LENGTH}"
    return None


def check_image_name(image: str, *, where: str = "image") -> str:
    """``image`` when Vast can pull it; a ``ValueError`` naming it and saying why otherwise."""
    problem = image_name_problem(image)
    if problem is not None:
        raise ValueError(
            f"{where}={image!r} is not a Docker image name ({problem}). Write e.g. {EXAMPLES}."
        )
    return image
