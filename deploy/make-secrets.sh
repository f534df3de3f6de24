#!/bin/sh
# Create the secret files of docker-compose.yml in deploy/secrets/ (or in the directory given
# as the first argument): random passwords, and the files derived from them, so that each
# password matches on both sides (Kafka's JAAS file and ARB_KAFKA_SASL_PASSWORD, MongoDB's
# root password and ARB_MONGO_URI). Existing files are kept: run it again after deleting one
# to rotate it (then recreate the data volume of a service that stores it, see
# docs/docker.md). POSIX sh; needs /dev/urandom, tr, head.
#
# Files are mode 0644 in a 0700 directory: compose bind-mounts each file into containers that
# run as various non-root users, which must read it; other users of this host cannot reach
# the directory. Values carry no trailing newline.
set -eu

dir="${1:-$(dirname "$0")/secrets}"
mkdir -p "$dir"
chmod 0700 "$dir"
umask 022

random() {  # 32 characters of [A-Za-z0-9]: safe in URIs, JAAS strings and shells
    LC_ALL=C tr -dc 'A-Za-z0-9' < /dev/urandom | head -c 32
}

# write NAME VALUE: create $dir/NAME with VALUE unless it exists
write() {
    if [ -e "$dir/$1" ]; then
        echo "kept     $dir/$1"
    else
        printf '%s' "$2" > "$dir/$1"
        chmod 0644 "$dir/$1"
        echo "created  $dir/$1"
    fi
}

write ARB_KAFKA_SASL_PASSWORD "$(random)"
write ARB_INFLUX_PASSWORD "$(random)"
write INFLUX_GRAFANA_PASSWORD "$(random)"
write MONGO_ROOT_PASSWORD "$(random)"
write GRAFANA_ADMIN_PASSWORD "$(random)"
# Empty: the SMTP relay needs no authentication. Put the password here (printf '%s' ...) if it
# does, and ARB_SMTP_USERNAME in .env.
write ARB_SMTP_PASSWORD ""

kafka="$(cat "$dir/ARB_KAFKA_SASL_PASSWORD")"
mongo="$(cat "$dir/MONGO_ROOT_PASSWORD")"
# The broker's PLAIN users: user_<name>="<password>" (the arbstream containers log in as
# arbstream, docker-compose.yml ARB_KAFKA_SASL_USERNAME).
write kafka_server_jaas.conf "KafkaServer {
    org.apache.kafka.common.security.plain.PlainLoginModule required
    user_arbstream=\"$kafka\";
};
"
write ARB_MONGO_URI "mongodb://arbstream:$mongo@mongodb:27017/?authSource=admin"
