# keel/base:dev: built by scripts/images.sh from the host's busybox-static and glibc,
# so no registry is needed (air-gapped gateways build the same way).
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin:/bin
WORKDIR /data
CMD ["/bin/sh"]
