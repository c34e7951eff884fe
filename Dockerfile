# The agent image: the task store's code and its dependencies, run as an unprivileged user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY db ./db
COPY context_storage ./context_storage
COPY dashboard ./dashboard
COPY cli ./cli
COPY ops ./ops
COPY private_files ./private_files
RUN pip install --no-cache-dir .

COPY main.py config.yaml alembic.ini ./
RUN useradd --create-home --uid 10001 agent && mkdir -p /app/contexts && chown agent /app/contexts
USER agent

CMD ["python", "main.py"]
