FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md beat_schedule.py ./
COPY creditworker ./creditworker
COPY producers ./producers
RUN pip install --no-cache-dir '.[http]' \
    && useradd --create-home --uid 10001 creditworker \
    && mkdir -p /data && chown creditworker /data
USER creditworker
WORKDIR /data
ENV CREDITWORKER_DATA_DIR=/data \
    CREDITWORKER_LEDGER_PATH=/data/ledger.jsonl
