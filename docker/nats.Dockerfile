# keel/nats:dev: Debian's nats-server on keel/base. JetStream store under /data.
FROM keel/base:dev
COPY nats-server /usr/local/bin/nats-server
EXPOSE 4222 8222
VOLUME /data
ENTRYPOINT ["/usr/local/bin/nats-server"]
CMD ["-js", "-sd", "/data", "-m", "8222"]
