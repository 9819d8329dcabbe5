# keyring sidecar image. The sidecar is the only holder of root keys: pass them at run
# time (KEYRING_ENCRYPT_KEYS / KEYRING_INDEX_KEYS or a mounted KEYRING_KEY_FILE), never bake them in.
FROM node:20-bookworm-slim
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev
COPY bin ./bin
COPY src ./src
COPY sidecar ./sidecar
COPY sql ./sql
USER node
EXPOSE 8787
HEALTHCHECK --interval=10s --timeout=3s CMD node -e "fetch('http://127.0.0.1:8787/healthz').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"
ENTRYPOINT ["node", "bin/keyring.js"]
CMD ["sidecar"]
